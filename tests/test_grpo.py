"""6-grpo_train.py and model/grpo.py: data, rollouts on our engine, tool-use episodes, trl's GRPO loop on tiny
models (KL at step 0, the MoE balance loss, a reward model, LoRA, torchrun)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config
from pipeline_helpers import script_main

from model.arithmetic import make_problems, write_jsonl_atomic
from model.checkpoint import TOKENIZER3_DIR, load_tokenizer, read_checkpoint, save_weights
from model.grpo import EngineRollout, ToolRollout, load_grpo_records, records_to_dataset
from model.model import MiniMindForCausalLM
from model.rewards import build_rewards

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def grpo_main():
    return script_main("6-grpo_train.py", "grpo_train")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    problems = make_problems(40, seed=0, max_value=9)
    write_jsonl_atomic(tmp / "rl.jsonl", [{"prompt": p["prompt"], "answer": p["answer"]} for p in problems])
    for name, extra in (("dense", {}), ("moe", {"use_moe": True})):
        torch.manual_seed(0)
        config = tiny_config(vocab_size=6400, max_seq_len=128, **extra)
        save_weights(MiniMindForCausalLM(config).state_dict(), tmp / f"init_{name}.pth", config)
    return tmp


def run(work, init, out, *extra):
    argv = ["--init", work / f"init_{init}.pth", "--data_path", work / "rl.jsonl", "--out_dir", work / out,
            "--images_dir", work / "images", "--device", "cpu", "--batch_size", "8", "--num_generations", "4",
            "--max_completion_length", "12", "--log_interval", "1", "--learning_rate", "1e-3", *extra]
    grpo_main()([str(a) for a in argv])
    return [json.loads(line) for line in (work / out / f"grpo_64{'_moe' if init == 'moe' else ''}_metrics.jsonl")
            .read_text(encoding="utf-8").splitlines()]


def test_records_prompts_or_conversations_and_bad_lines_reported(tmp_path, capsys):
    path = tmp_path / "rl.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "1+1=?", "answer": 2}),
        "{not json",
        json.dumps({"conversations": [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "4"}],
                    "gt": "4"}),
        json.dumps({"answer": "3"}),
    ]) + "\n", encoding="utf-8")
    records = load_grpo_records(path)
    assert [r["answer"] for r in records] == ["2", "4"]
    assert records[1]["messages"] == [{"role": "user", "content": "2+2=?"}]  # the reply after the prompt is dropped
    err = capsys.readouterr().err
    assert "skipped 2 malformed record(s)" in err and "line 2: invalid JSON" in err and "line 4:" in err
    with pytest.raises(Exception, match="data_process.py arithmetic"):
        load_grpo_records(tmp_path / "missing.jsonl")


def test_engine_rollout_is_batched_and_reproducible(work):
    model = read_checkpoint(work / "init_dense.pth")
    policy = MiniMindForCausalLM(model.config)
    policy.load_state_dict(model.state)
    tok = load_tokenizer()
    prompts = records_to_dataset(load_grpo_records(work / "rl.jsonl"), tok)["prompt"][:4]
    first = EngineRollout(tok, 8, seed=3)
    again = EngineRollout(tok, 8, seed=3)
    ids = first.encode(prompts)
    a, b = first.generate(policy, ids), again.generate(policy, ids)
    assert a == b and all(0 < len(x) <= 8 for x in a)
    assert first.generate(policy, ids) != a  # the next call draws new seeds
    assert policy.training  # the rollout restores the mode it found


def test_kl_is_zero_at_step_zero_and_moe_balance_loss_joins(work):
    lines = run(work, "moe", "out_kl", "--beta", "0.04", "--max_steps", "2", "--val_fraction", "0.1")
    assert set(lines[0]) == {"step", "val_accuracy", "val_accuracy_sampled"} and lines[0]["step"] == 0  # the start
    assert lines[1]["step"] == 1 and lines[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(line["aux_loss"] > 0 for line in lines[1:])
    assert (work / "images" / "grpo_64_moe_loss.png").is_file()
    for key in ("reward", "rewards/math/mean", "rewards/format/mean", "rewards/length/mean",
                "completions/mean_length", "completions/clipped_ratio", "val_accuracy"):
        assert key in lines[-1], key
    assert (work / "out_kl" / "grpo_64_moe.pth").is_file()


def tiny_reward_model(folder):
    """A tiny transformers sequence-classification model (Llama) with our tokenizer, as a user would save one."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_reward_model_lora_and_activation_checkpointing(work):
    rm = tiny_reward_model(work / "rm")
    lines = run(work, "dense", "out_lora", "--max_steps", "2", "--rewards", "math", "rm:0.5", "--reward_model", rm,
                "--use_lora", "--gradient_checkpointing", "--val_fraction", "0")
    assert "rewards/rm/mean" in lines[-1] and "rewards/math/mean" in lines[-1]
    assert (work / "out_lora" / "grpo_64_lora").is_dir()
    merged = read_checkpoint(work / "out_lora" / "grpo_64.pth")
    assert not any("lora" in k for k in merged.state)


def test_bad_flags_are_one_line_errors(work, capsys):
    with pytest.raises(SystemExit):
        run(work, "dense", "out_bad", "--batch_size", "6", "--num_generations", "4")
    assert "multiple of --num_generations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(work, "dense", "out_bad", "--task", "tools")
    assert "needs a chat template with tools" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(work, "dense", "out_bad", "--rewards", "rm", "--reward_model", work / "nowhere")
    assert "not a transformers model folder" in capsys.readouterr().err


def scripted(replies_by_turn):
    """A generate_fn that answers turn k with the k-th scripted text (+ the end token) for every episode."""
    tok = load_tokenizer(TOKENIZER3_DIR)
    turn = {"k": 0}

    def generate_fn(prompts, room):
        text = replies_by_turn[turn["k"]]
        turn["k"] += 1
        return [tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _ in prompts]
    return generate_fn


def test_a_two_call_tool_episode_renders_parses_and_scores_exactly():
    tok = load_tokenizer(TOKENIZER3_DIR)
    record = {"messages": [{"role": "user", "content": "从 2024-01-01 到 2024-01-31 一共多少天？换算成小时是多少？"}],
              "answer": "720", "tools": None}
    data = records_to_dataset([record], tok, task="tools")
    tools = json.loads(data["tools"][0])
    between = {"name": "date_tool", "arguments": {"operation": "between", "date": "2024-01-01",
                                                  "other_date": "2024-01-31"}}
    hours = {"name": "calculator", "arguments": {"expression": "30*24"}}
    turns = [f"<tool_call>\n{json.dumps(between, ensure_ascii=False)}\n</tool_call>",
             f"<tool_call>\n{json.dumps(hours)}\n</tool_call>", "一共 30 天，答案是 \\boxed{720}。"]
    rollout = ToolRollout(tok, max_completion_length=400, max_tool_turns=3)
    prompt_ids, [episode] = rollout.run_episodes(data["prompt"], [record["messages"]], [tools], scripted(turns))
    assert episode.finished and episode.results == ["30", "720"] and len(episode.turns) == 3

    # The prompt + completion is exactly the template's rendering of the whole conversation.
    conversation = record["messages"] + [
        {"role": "assistant", "content": "", "tool_calls": [between]}, {"role": "tool", "content": "30"},
        {"role": "assistant", "content": "", "tool_calls": [hours]}, {"role": "tool", "content": "720"},
        {"role": "assistant", "content": turns[2]}]
    rendered = tok.apply_chat_template(conversation, tools=tools, tokenize=False)
    assert tok.decode(prompt_ids[0] + episode.completion, skip_special_tokens=False) == rendered.rstrip("\n")
    # Only the model's own tokens are trained on: the tool responses and template glue are masked out.
    model_text = tok.decode([t for t, m in zip(episode.completion, episode.env_mask) if m], skip_special_tokens=False)
    assert model_text == "".join(t + "<|im_end|>" for t in turns)

    funcs, _ = build_rewards(["tool", "format", "math"], tok, 400)
    kwargs = dict(prompts=data["prompt"], completions=[""], completion_ids=[episode.completion], answer=["720"],
                  episode=[episode.record()], final_reply=[episode.turns[-1]])
    assert [f(**kwargs) for f in funcs] == [[1.2], [1.0], [1.0]]


def test_an_episode_cut_off_by_the_turn_limit_is_unfinished():
    tok = load_tokenizer(TOKENIZER3_DIR)
    record = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2", "tools": None}
    data = records_to_dataset([record], tok, task="tools")
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    rollout = ToolRollout(tok, max_completion_length=400, max_tool_turns=1)
    _, [episode] = rollout.run_episodes(data["prompt"], [record["messages"]], [json.loads(data["tools"][0])],
                                        scripted([call, call]))
    assert not episode.finished and episode.results == ["2"]
    funcs, _ = build_rewards(["tool"], tok, 400)
    score = funcs[0](prompts=data["prompt"], completions=[""], completion_ids=[episode.completion], answer=["2"],
                     episode=[episode.record()], final_reply=[episode.turns[-1]])
    assert score == [pytest.approx(0.2 - 0.5)]  # valid calls, no answer, cut off


def test_torchrun_two_processes(work):
    out = work / "out_ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "6-grpo_train.py"), "--init", str(work / "init_dense.pth"), "--data_path", str(work / "rl.jsonl"),
           "--out_dir", str(out), "--images_dir", str(work / "images"), "--device", "cpu", "--batch_size", "4",
           "--num_generations", "4", "--max_completion_length", "8", "--max_steps", "2", "--val_fraction", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert (out / "grpo_64.pth").is_file()


@pytest.mark.parametrize("use_moe", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_moe):
    from conftest import tiny_model

    ids = torch.randint(0, 256, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(use_moe=use_moe).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        out = model(input_ids=ids, labels=ids)
        (out.loss + (out.aux_loss if out.aux_loss is not None else 0)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tool_task_runs_through_the_trainer_on_a_minimind3_model(work):
    from model.arithmetic import write_sets

    write_sets(work / "tools.jsonl", work / "tools_sft.jsonl", 8, seed=0, max_value=9, task="tools")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=6400, max_seq_len=1024, qk_norm=True, rope_layout="half")
    save_weights(MiniMindForCausalLM(config).state_dict(), work / "init_m3.pth", config)
    argv = ["--init", work / "init_m3.pth", "--data_path", work / "tools.jsonl", "--out_dir", work / "out_tools",
            "--images_dir", work / "images", "--device", "cpu", "--batch_size", "4", "--num_generations", "4",
            "--max_completion_length", "24", "--max_steps", "1", "--val_fraction", "0", "--task", "tools",
            "--max_tool_turns", "2"]
    grpo_main()([str(a) for a in argv])
    line = json.loads((work / "out_tools" / "grpo_64_metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert {"rewards/tool/mean", "rewards/format/mean", "rewards/length/mean"} <= set(line)
    assert (work / "out_tools" / "grpo_64.pth").is_file()

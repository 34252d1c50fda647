"""The continuous-batching engine: batched == alone, admission between steps, slot reuse, chunked prefill,
cancellation, logprobs, and the CPU proxies for "no compute on padding" and "one forward per step"."""

import threading

import pytest
import torch
from conftest import tiny_model

from model.engine import Engine, last_token_logits
from model.generate import generate
from model.sampling import SamplingParams

NO_EOS = -1
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def prompts_of(n, seed=0, lo=1, hi=20):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(lo, hi, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone(model, prompt, params, **kw):
    return Engine(model, max_batch=1, **kw).submit(prompt, params, eos_token_id=NO_EOS).tokens()


class ForwardSpy:
    """Records (batch, length) of every model call, and how many of those positions were real tokens."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        original = model.forward

        def spy(input_ids=None, **kw):
            self.calls.append(tuple(input_ids.shape))
            return original(input_ids=input_ids, **kw)

        monkeypatch.setattr(model, "forward", spy)

    @property
    def positions(self):
        return sum(b * t for b, t in self.calls)


@pytest.mark.parametrize("use_moe", [False, True])
def test_staggered_requests_equal_their_sequential_results(use_moe):
    model = tiny_model(use_moe=use_moe, max_seq_len=64)
    prompts = prompts_of(6, seed=1)
    expected = [alone(model, p, GREEDY) for p in prompts]
    engine = Engine(model, max_batch=4)
    handles = []
    for p in prompts:  # a new request arrives between every two decode steps
        handles.append(engine.submit(p, GREEDY, eos_token_id=NO_EOS))
        engine.step()
        engine.step()
    while not all(h.done for h in handles):
        engine.step()
    assert [[o.token for o in h if o.token is not None] for h in handles] == expected
    assert engine.num_active == 0 and all(h.finish_reason == "length" for h in handles)


def test_mixed_sampling_settings_in_one_batch_equal_each_alone():
    model = tiny_model(max_seq_len=64)
    settings = [SamplingParams(max_new_tokens=10, temperature=0),
                SamplingParams(max_new_tokens=10, temperature=1.0, seed=3),
                SamplingParams(max_new_tokens=7, temperature=0.8, top_k=5, seed=4),
                SamplingParams(max_new_tokens=10, temperature=1.2, top_p=0.5, seed=5),
                SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.5),
                SamplingParams(max_new_tokens=9, temperature=0.9, repetition_penalty=1.3, seed=6)]
    prompts = prompts_of(len(settings), seed=2)
    expected = [alone(model, p, s) for p, s in zip(prompts, settings)]
    engine = Engine(model, max_batch=len(settings))
    handles = [engine.submit(p, s, eos_token_id=NO_EOS) for p, s in zip(prompts, settings)]
    assert [h.tokens() for h in handles] == expected
    assert [len(t) for t in expected] == [s.max_new_tokens for s in settings]


def test_slots_are_reused_and_memory_stays_bounded():
    model = tiny_model(max_seq_len=64)
    engine = Engine(model, max_batch=2)
    sizes = [tuple(k.shape) for k in engine.cache.k]
    prompts = prompts_of(7, seed=3)
    handles = [engine.submit(p, SamplingParams(max_new_tokens=3 + i, temperature=0), eos_token_id=NO_EOS)
               for i, p in enumerate(prompts)]
    peak = 0
    while not all(h.done for h in handles):
        engine.step()
        peak = max(peak, engine.num_active)
    assert peak == 2 and [len(h.tokens()) for h in handles] == [3 + i for i in range(7)]
    assert [tuple(k.shape) for k in engine.cache.k] == sizes  # nothing grew


def test_one_batched_forward_per_decode_step_and_no_padding_computed(monkeypatch):
    model = tiny_model(max_seq_len=64)
    prompts = prompts_of(8, seed=4)
    spy = ForwardSpy(model, monkeypatch)
    n_new = 10
    out = generate(model, prompts, max_new_tokens=n_new, temperature=0, eos_token_id=NO_EOS)
    assert [len(o) for o in out] == [n_new] * 8
    # one packed prefill of all prompts, then one forward per decode step for all eight rows together
    assert spy.calls[0] == (1, sum(map(len, prompts)))
    assert spy.calls[1:] == [(8, 1)] * (n_new - 1)
    real = sum(map(len, prompts)) + 8 * (n_new - 1)  # every prompt token once, every fed-back token once
    assert spy.positions == real  # padding share 0


def drain(handle):
    out = []
    while not handle.events.empty():
        out.append(handle.events.get_nowait())
    return [o.token for o in out if o.token is not None]


def greedy(n):
    return SamplingParams(max_new_tokens=n, temperature=0)


def test_long_prompt_is_chunked_and_does_not_stall_decoding():
    model = tiny_model(max_seq_len=128)
    short, long = [5, 6, 7], prompts_of(1, seed=5, lo=100, hi=101)[0]
    engine = Engine(model, max_batch=2, prefill_chunk=16)
    a = engine.submit(short, greedy(20), eos_token_id=NO_EOS)
    engine.step()  # `short` is decoding now
    b = engine.submit(long, greedy(4), eos_token_id=NO_EOS)
    got_a = drain(a)
    for _ in range(len(long) // 16):  # the long prompt needs 7 chunks of 16; `short` gets a token every step
        engine.step()
        assert b.completion_tokens == 0
        new = drain(a)
        assert len(new) == 1
        got_a += new
    while not (a.done and b.done):
        engine.step()
    assert got_a + drain(a) == alone(model, short, greedy(20))
    assert drain(b) == alone(model, long, greedy(4))


def test_cancel_frees_the_slot_within_one_step():
    model = tiny_model(max_seq_len=64)
    engine = Engine(model, max_batch=1)
    first = engine.submit([3, 4, 5], SamplingParams(max_new_tokens=50, temperature=0), eos_token_id=NO_EOS)
    second = engine.submit([6, 7], SamplingParams(max_new_tokens=3, temperature=0), eos_token_id=NO_EOS)
    engine.step()
    engine.step()
    assert engine.num_active == 1 and engine.num_waiting == 1
    first.cancel()
    engine.step()  # the cancelled one leaves and the waiting one takes its slot in the same step
    assert first.finish_reason == "cancelled" and engine.num_waiting == 0 and engine.num_active == 1
    assert second.tokens() == alone(model, [6, 7], greedy(3))


def test_eos_ends_a_row_and_is_reported():
    model = tiny_model(max_seq_len=64)
    free = alone(model, [5, 6, 7], greedy(8))
    eos = free[3]
    out = Engine(model).submit([5, 6, 7], greedy(8), eos_token_id=eos)
    events = list(out)
    assert [e.token for e in events] == free[:free.index(eos) + 1]
    assert events[-1].finish_reason == "stop" and out.finish_reason == "stop"


def test_logprobs_are_the_models_own_distribution():
    model = tiny_model(max_seq_len=64)
    prompt = [5, 6, 7, 8]
    events = list(Engine(model).submit(prompt, greedy(5), eos_token_id=NO_EOS, top_logprobs=3))
    ids = torch.tensor([prompt + [e.token for e in events]])
    with torch.no_grad():
        ref = model(ids).logits[0].float().log_softmax(-1)
    for i, e in enumerate(events):
        row = ref[len(prompt) - 1 + i]
        assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == row.topk(3).indices.tolist()
        assert e.top_logprobs[0][0] == e.token  # greedy picks the most likely token


def test_a_failing_step_fails_its_requests_not_the_engine(monkeypatch):
    model = tiny_model(max_seq_len=64)
    engine = Engine(model, max_batch=2)
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    h = engine.submit([3, 4], greedy(3), eos_token_id=NO_EOS)
    engine.step()
    assert h.finish_reason == "error" and "out of memory" in str(list(h)[-1].error)
    monkeypatch.setattr(model, "forward", original)
    assert engine.submit([3, 4], greedy(3), eos_token_id=NO_EOS).tokens() == alone(model, [3, 4], greedy(3))


def test_background_loop_serves_many_threads():
    model = tiny_model(max_seq_len=64)
    prompts = prompts_of(12, seed=6)
    expected = [alone(model, p, greedy(8)) for p in prompts]
    engine = Engine(model, max_batch=4).start()
    got = [None] * len(prompts)

    def ask(i):
        got[i] = engine.submit(prompts[i], greedy(8), eos_token_id=NO_EOS).tokens()

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.stop()
    assert got == expected
    assert engine.stats.tokens_generated == 8 * len(prompts)


def test_bad_submissions_are_refused():
    engine = Engine(tiny_model(max_seq_len=64))
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([300], GREEDY)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit([3], SamplingParams(max_new_tokens=0))


def test_the_loop_survives_a_failing_scheduler(monkeypatch):
    model = tiny_model(max_seq_len=64)
    engine = Engine(model, max_batch=2).start()
    monkeypatch.setattr(engine, "_admit", lambda: (_ for _ in ()).throw(RuntimeError("scheduler bug")))
    failed = engine.submit([3, 4], greedy(3), eos_token_id=NO_EOS)
    events = list(failed)
    assert failed.finish_reason == "error" and "scheduler bug" in str(events[-1].error)
    monkeypatch.undo()
    assert engine.submit([3, 4], greedy(3), eos_token_id=NO_EOS).tokens() == alone(model, [3, 4], greedy(3))
    engine.stop()


@pytest.mark.parametrize("use_moe", [False, True])
def test_scoring_packs_prompts_without_padding(use_moe, monkeypatch):
    model = tiny_model(use_moe=use_moe, max_seq_len=64)
    prompts = prompts_of(9, seed=7, lo=1, hi=40)
    with torch.no_grad():
        expected = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
    spy = ForwardSpy(model, monkeypatch)
    got = last_token_logits(model, prompts, max_prompts=4)
    assert torch.allclose(got, expected, atol=1e-4)  # the same math; summation order differs with packing
    assert spy.positions == sum(map(len, prompts))  # every position a real token
    assert all(b == 1 and t <= 64 for b, t in spy.calls) and len(spy.calls) < len(prompts)
    letters = last_token_logits(model, prompts, select=[5, 9, 11, 2])
    assert torch.allclose(letters, expected[:, [5, 9, 11, 2]], atol=1e-4)


def test_a_bfloat16_model_runs_with_a_bfloat16_cache():
    """The dtype a GPU server uses: the cache follows the weights, sampling reads float32 logits."""
    model = tiny_model(max_seq_len=64).to(torch.bfloat16)
    engine = Engine(model, max_batch=3)
    assert engine.cache.k[0].dtype == torch.bfloat16
    out = engine.generate_batch(prompts_of(3, seed=8), SamplingParams(max_new_tokens=6, temperature=0.8, seed=1),
                                eos_token_id=NO_EOS)
    assert [len(o) for o in out] == [6, 6, 6] and all(0 <= t < 256 for o in out for t in o)

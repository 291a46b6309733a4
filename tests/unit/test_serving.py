"""The request handling around the engine: weights, limits, auth, the OpenAI shapes, streaming.
The engine here is a stand-in that echoes what it was given; the real vLLM engine behind real
HTTP is tested in tests/integration/test_serving.py."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from moalign.conditioning import WeightsError
from moalign.export_folder import PolicyCard
from services.api import build_api
from services.engine import Delta
from services.policy import PolicyService

NAMES = ["Relevance", "Conciseness", "Positivity"]


def card(style="chat_system", decimals=2):
    return PolicyCard(
        objectives=NAMES,
        style=style,
        decimals=decimals,
        example_line="",
        default_weights=[1 / 3] * 3,
        base_model="tiny",
        algorithm="mo_odpo",
        step=3,
        dtype="float32",
        max_prompt_tokens=160,
    )


class ChatTokenizer:
    """Renders `role: content` lines; one token per character, so the prompt reads back exactly."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class EchoEngine:
    """Answers with the weight line it read, a word per delta; records what it was asked."""

    max_model_len = 4096

    def __init__(self):
        self.calls = []
        self.closed_early = 0

    async def generate(self, prompt_ids, *, max_tokens, temperature, top_p, seed, stop):
        self.calls.append({"prompt": "".join(chr(i) for i in prompt_ids), "max_tokens": max_tokens, "seed": seed, "stop": stop})
        words = ["weights", "were", "read", "here"][:max_tokens]
        finished = False
        try:
            for i, word in enumerate(words):
                last = i == len(words) - 1
                yield Delta(
                    text=("" if i == 0 else " ") + word,
                    token_ids=[i],
                    prompt_token_ids=list(prompt_ids),
                    finish_reason=("length" if last else None),
                )
            finished = True
        finally:
            if not finished:
                self.closed_early += 1


def client(token=None, limit=4096, style="chat_system"):
    engine = EchoEngine()
    service = PolicyService(card(style), ChatTokenizer(), engine, "tiny-policy", max_tokens_limit=64, default_max_tokens=16)
    return TestClient(build_api(service, api_token=token, max_body_bytes=limit)), engine


def chat(weights=None, **extra):
    body = {"model": "tiny-policy", "messages": [{"role": "user", "content": "How do I keep basil alive?"}], **extra}
    if weights is not None:
        body["objective_weights"] = weights
    return body


def test_weights_reach_the_prompt_as_training_wrote_them():
    http, engine = client()
    r = http.post("/v1/chat/completions", json=chat({"Relevance": 0.7, "Conciseness": 0.3}))
    assert r.status_code == 200, r.text
    prompt = engine.calls[-1]["prompt"]
    assert prompt.startswith(
        "<system>[Begin System Instruction] Relevance: 0.70, Conciseness: 0.30, Positivity: 0.00 [End System Instruction]\n"
    )
    assert prompt.endswith("<user>How do I keep basil alive?\n<assistant>")
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-policy"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "weights were read here"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["objective_weights"] == {"Relevance": 0.7, "Conciseness": 0.3, "Positivity": 0.0}
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens"] == len(prompt)
    assert "token_ids" not in body["choices"][0]
    with_ids = http.post("/v1/chat/completions", json=chat({"Relevance": 1}, return_token_ids=True)).json()
    assert with_ids["choices"][0]["token_ids"] == [0, 1, 2, 3]
    assert "".join(map(chr, with_ids["prompt_token_ids"])) == engine.calls[-1]["prompt"]


def test_missing_weights_use_the_default_and_other_weights_change_the_prompt():
    http, engine = client()
    http.post("/v1/chat/completions", json=chat())
    http.post("/v1/chat/completions", json=chat({"Positivity": 1}))
    default, corner = engine.calls[0]["prompt"], engine.calls[1]["prompt"]
    assert "Relevance: 0.34, Conciseness: 0.33, Positivity: 0.33" in default
    assert "Relevance: 0.00, Conciseness: 0.00, Positivity: 1.00" in corner


def test_user_system_message_follows_the_weight_line_and_prefix_style_goes_before_the_question():
    http, engine = client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert http.post("/v1/chat/completions", json={"messages": messages}).status_code == 200
    assert engine.calls[-1]["prompt"].startswith("<system>[Begin System Instruction] Relevance: 0.34")
    assert "[End System Instruction]\nBe brief.\n<user>Hi?" in engine.calls[-1]["prompt"]
    http, engine = client(style="system_prefix")
    assert http.post("/v1/chat/completions", json=chat({"Conciseness": 1.0})).status_code == 200
    assert engine.calls[-1]["prompt"].startswith("<user>[Begin System Instruction] Relevance: 0.00, Conciseness: 1.00")


@pytest.mark.parametrize(
    "weights, words",
    [
        ({"Helpfulness": 1.0}, "unknown objective"),
        ({"Relevance": -0.5, "Conciseness": 1.5}, "negative for ['Relevance']"),
        ({"Relevance": 0.5, "Conciseness": 0.2}, "sum to 1"),
        ({"Relevance": "a lot"}, "objective_weights"),
    ],
)
def test_bad_weights_are_422_naming_the_problem(weights, words):
    http, engine = client()
    r = http.post("/v1/chat/completions", json=chat(weights))
    assert r.status_code == 422
    assert words in r.json()["error"]["message"]
    assert engine.calls == []


def test_token_size_and_request_limits():
    http, _ = client(token="s3cret", limit=2048)
    assert http.post("/v1/chat/completions", json=chat()).status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert http.get("/v1/models", headers=auth).json()["data"][0]["objectives"] == NAMES
    assert http.get("/healthz").status_code == 200  # probes need no token
    big = chat(padding="x" * 5000)
    assert http.post("/v1/chat/completions", json=big, headers=auth).status_code == 413
    assert http.post("/v1/chat/completions", json=chat(max_tokens=65), headers=auth).status_code == 422
    assert http.post("/v1/chat/completions", json=chat(n=2), headers=auth).status_code == 422
    r = http.post("/v1/chat/completions", json=chat(model="other"), headers=auth)
    assert r.status_code == 404 and "tiny-policy" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", content=b"\x80\x04pickle", headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]}, headers=auth)
    assert r.status_code == 422 and "last message" in r.json()["error"]["message"]


def test_chunked_upload_over_the_limit_is_cut_off():
    http, _ = client(limit=2048)

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 512
        yield b'"}]}'

    assert http.post("/v1/chat/completions", content=chunks()).status_code == 413


def test_stream_carries_the_same_text_as_a_plain_answer():
    http, _ = client()
    plain = http.post("/v1/chat/completions", json=chat({"Relevance": 1})).json()["choices"][0]["message"]["content"]
    with http.stream("POST", "/v1/chat/completions", json=chat({"Relevance": 1}, stream=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["objective_weights"] == {"Relevance": 1.0, "Conciseness": 0.0, "Positivity": 0.0}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_render_shows_the_conditioned_prompt_without_generating():
    http, engine = client()
    r = http.post("/v1/render", json=chat({"Conciseness": 1}))
    assert r.status_code == 200 and engine.calls == []
    assert "Conciseness: 1.00" in r.json()["prompt"]


def test_card_weights_contract():
    c = card()
    assert np.allclose(c.weights(None), [1 / 3] * 3)
    assert np.allclose(c.weights({"Conciseness": 1}), [0, 1, 0])
    with pytest.raises(WeightsError, match="unknown"):
        c.weights({"relevance": 1})
    with pytest.raises(WeightsError, match="sum to 1"):
        c.weights({"Relevance": 0.9})


def test_a_stream_left_early_closes_the_engine_request():
    import asyncio

    engine = EchoEngine()
    service = PolicyService(card(), ChatTokenizer(), engine, "tiny-policy", max_tokens_limit=64, default_max_tokens=16)

    async def leave_after_first_words():
        events = await service.stream(service.parse(json.dumps(chat(stream=True)).encode()))
        await events.__anext__()  # the role chunk
        await events.__anext__()  # the first words
        await events.aclose()

    asyncio.run(leave_after_first_words())
    assert engine.closed_early == 1


def test_a_request_the_engine_refuses_is_422_and_the_service_goes_on():
    from services.engine import RequestRefused

    class PickyEngine(EchoEngine):
        async def generate(self, prompt_ids, **kw):
            if kw["seed"] == 13:
                raise RequestRefused("vLLM refused req-0: seed 13 is unlucky")
            async for delta in super().generate(prompt_ids, **kw):
                yield delta

    engine = PickyEngine()
    http = TestClient(
        build_api(
            PolicyService(card(), ChatTokenizer(), engine, "tiny-policy", max_tokens_limit=64, default_max_tokens=16),
            api_token=None,
            max_body_bytes=4096,
        )
    )
    r = http.post("/v1/chat/completions", json=chat(seed=13))
    assert r.status_code == 422 and "unlucky" in r.json()["error"]["message"]
    assert http.post("/v1/chat/completions", json=chat(seed=1)).status_code == 200


# ---------------------------------------------------------------- which folder `make serve` serves


def exported_run(root):
    """A run directory as a LoRA run leaves it: a checkpoint, and the export RUN_DIR/final with its
    merged weights, card and adapter/ (file contents do not matter to the check)."""
    from moalign.export_folder import write_card

    run = root / "run"
    checkpoint = run / "checkpoints" / "step_00000002"
    (checkpoint / "learner").mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    (run / "config.yaml").write_text("steps: 2\n")
    final = run / "final"
    (final / "adapter").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (final / name).write_text("{}")
    write_card(final, card())
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (final / "adapter" / name).write_text("{}")
    write_card(final / "adapter", card())  # as the learner writes it: the adapter looks servable
    return run


@pytest.fixture
def serve_main(monkeypatch, caplog):
    """serve.py's main, where starting Ray or Ray Serve fails the test: each refusal must come
    first. Returns (exit code, the one error line)."""
    import ray
    from ray import serve as ray_serve

    import serve

    def started(*args, **kwargs):
        raise AssertionError("Ray was started for a folder that should have been refused")

    monkeypatch.setattr(ray, "init", started)
    monkeypatch.setattr(ray_serve, "start", started)
    monkeypatch.setattr(ray_serve, "run", started)

    def run(folder):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="moalign.serve"):
            code = serve.main(["--config", str(Path(__file__).resolve().parents[2] / "configs/serve/local.yaml"), "--model", str(folder)])
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0], errors
        return code, errors[0]

    return run


def test_serve_refuses_the_adapter_folder_of_an_export_naming_the_merged_folder(serve_main, tmp_path):
    final = exported_run(tmp_path) / "final"
    code, error = serve_main(final / "adapter")
    assert code == 2
    assert error.startswith(f"{final / 'adapter'} is the PEFT adapter of an export")
    assert error.endswith(f"serve the merged policy beside it: make serve MODEL={final}")


def test_serve_refuses_a_training_checkpoint_and_an_empty_folder_saying_what_to_serve(serve_main, tmp_path):
    run = exported_run(tmp_path)
    code, error = serve_main(run / "checkpoints" / "step_00000002")
    assert code == 2
    assert "is a training checkpoint (the learner's state at step 2), not an exported policy" in error
    assert f"make export RUN={run} STEP=2, then make serve MODEL={run / 'export' / 'step_2'}" in error
    assert error.endswith(f"or serve the run's last policy: make serve MODEL={run / 'final'}")
    (tmp_path / "empty").mkdir()
    code, error = serve_main(tmp_path / "empty")
    assert code == 2 and error.startswith(f"{tmp_path / 'empty'} is an empty folder, not an exported policy; serve RUN_DIR/final")


def test_every_other_folder_that_is_not_an_exported_policy_gets_one_line_saying_what_it_is(tmp_path):
    from services.deployment import NotServable, check_servable

    run = exported_run(tmp_path)
    assert check_servable(run / "final") == (run / "final").resolve()
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_text("")
    (tmp_path / "weights.safetensors").write_text("")
    cards_only = tmp_path / "card-only"
    cards_only.mkdir()
    (cards_only / "moalign.json").write_text((run / "final" / "moalign.json").read_text())
    lone_adapter = tmp_path / "adapter"
    lone_adapter.mkdir()
    (lone_adapter / "adapter_config.json").write_text("{}")
    cases = {
        run: f"{run} is a run directory, not an exported policy; serve the policy the run exported: make serve MODEL={run / 'final'}",
        run / "checkpoints": f"{run / 'checkpoints'} holds a run's training checkpoints, not an exported policy; serve the policy",
        base: f"{base} has model files but no moalign.json: not a policy exported by moalign",
        cards_only: f"{cards_only} has moalign.json but not the merged model",
        lone_adapter: f"{lone_adapter} is a PEFT adapter (LoRA factors without their base model), not a merged policy",
        tmp_path / "weights.safetensors": "is a file, not a folder",
        tmp_path / "missing": "no such folder",
    }
    for folder, said in cases.items():
        with pytest.raises(NotServable) as refused:
            check_servable(folder)
        assert said in str(refused.value) and "\n" not in str(refused.value), (folder, str(refused.value))
    (run / "export" / "step_2").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "moalign.json"):
        (run / "export" / "step_2" / name).write_text((run / "final" / name).read_text())
    with pytest.raises(NotServable, match=r"holds exported policies but is not one; serve one of them: step_2 \(e\.g\. make serve MODEL="):
        check_servable(run / "export")

"""Export and serving end to end on a tiny model: a trained LoRA policy exported by the learner,
loaded by transformers, PEFT and (served) vLLM with the learner's own greedy tokens, then called
through real HTTP on loopback: weights per request, 401, 413, 422, streaming."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import pytest
import torch

from actors.learner import Learner
from moalign.conditioning import render_prompt_ids
from moalign.config import load_config
from moalign.export_folder import PolicyCard
from moalign.weight_transport import free_port

pytestmark = pytest.mark.integration

TOKEN = "test-token"
GREEDY_TOKENS = 8
QUESTION = [{"role": "user", "content": "How do I keep basil alive on a windowsill?"}]
WEIGHTS = {"relevant": {"Relevance": 1.0}, "mixed": {"Relevance": 0.2, "Conciseness": 0.5, "Positivity": 0.3}}


def greedy(forward, prompt_ids: list[int], steps: int = GREEDY_TOKENS) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = forward(torch.tensor([ids])).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """A LoRA policy after two DPO steps (so the adapter is not zero), exported; with the learner's
    own greedy continuation of the conditioned question under each weight vector."""
    from transformers import AutoTokenizer

    cfg = load_config(
        None,
        [f"model.path={tiny_model}", "learner.micro_batch_pairs=2", "rollout.prompts_per_step=4", "learner.lora.rank=4", "learner.lr=0.05"],
    )
    card = PolicyCard.from_run(cfg, step=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = {key: render_prompt_ids(tokenizer, card.condition(QUESTION, card.weights(w))) for key, w in WEIGHTS.items()}
    batch = {
        "prompt_ids": [prompts["relevant"], prompts["mixed"]] * 2,
        "chosen_ids": [[10, 11, 12], [13, 14], [15], [16, 17]],
        "rejected_ids": [[20], [21, 22, 23], [24, 25], [26]],
        "loss_weights": [1.0] * 4,
        "total_weight": 4.0,
    }
    dest = tmp_path_factory.mktemp("export") / "policy"
    with Learner(cfg, tiny_model, master_port=free_port()) as learner:
        for _ in range(2):
            learner.train_step(batch)
        with learner._eval_mode():
            tokens = {key: greedy(lambda x: learner.engine.module(input_ids=x), ids) for key, ids in prompts.items()}
        info = learner.export_policy(str(dest), card.model_dump())
    assert info["step"] == 2 and info["bytes"] > 0
    return {"dir": dest, "prompts": prompts, "tokens": tokens, "card": card, "base": tiny_model}


def test_export_loads_in_transformers_and_peft_with_the_learners_greedy_tokens(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exported["dir"]
    # The learner records which folder the adapter applies to (the run's base unless the model
    # was given new token rows); everything else is the card the run wrote.
    assert PolicyCard.read(folder) == exported["card"].model_copy(update={"adapter_base": str(exported["base"])})
    assert AutoTokenizer.from_pretrained(folder).chat_template
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    base = AutoModelForCausalLM.from_pretrained(exported["base"]).eval()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(exported["base"]), folder / "adapter").eval()
    trained_differs = False
    for key, prompt in exported["prompts"].items():
        assert greedy(lambda x: merged(input_ids=x), prompt) == exported["tokens"][key], key
        assert greedy(lambda x: adapter(input_ids=x), prompt) == exported["tokens"][key], key
        trained_differs |= greedy(lambda x: base(input_ids=x), prompt) != exported["tokens"][key]
    # Otherwise the checks above would pass for an export of the untrained base.
    with torch.no_grad():
        x = torch.tensor([exported["prompts"]["mixed"]])
        assert not torch.allclose(merged(input_ids=x).logits, base(input_ids=x).logits, atol=1e-4)


def test_only_the_merged_folder_of_a_real_export_passes_the_serving_check(exported):
    from services.deployment import NotServable, check_servable

    folder = exported["dir"]
    assert check_servable(folder) == folder.resolve()
    # The learner writes the card into adapter/ too: the check must still send the user to the merged folder.
    assert (folder / "adapter" / "moalign.json").is_file()
    with pytest.raises(NotServable, match=f"serve the merged policy beside it: make serve MODEL={folder.resolve()}$"):
        check_servable(folder / "adapter")


def _post(url: str, body: bytes | dict, token: str | None = TOKEN, timeout: float = 120) -> tuple[int, dict | str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw = r.read().decode()
            return r.status, (json.loads(raw) if r.headers.get("content-type", "").startswith("application/json") else raw)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode() or "{}")


@pytest.fixture(scope="module")
def service(exported, ray_cluster, monkeypatch_module):
    from ray import serve

    from services.deployment import app_builder

    port = free_port()
    monkeypatch_module.setenv("MOALIGN_SERVE_TEST_TOKEN", TOKEN)
    # The entry `serve run deploy/serve.yaml` uses, with the file's `args`.
    app = app_builder(
        {
            "model": str(exported["dir"]),
            "port": port,
            "api_token_env": "MOALIGN_SERVE_TEST_TOKEN",
            "max_body_bytes": 4096,
            "max_tokens_limit": 900,
            "default_max_tokens": 8,
            "max_model_len": 1024,
            "cpu_kvcache_gb": 0.25,
            "replica_cpus": 0.5,
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app, name="moalign-test", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the service did not come up within 600 s"
        time.sleep(2)
    yield base
    serve.delete("moalign-test")
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_requests_with_weights_reach_vllm_and_match_the_learner(service, exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["dir"])
    for key, weights in WEIGHTS.items():
        status, body = _post(
            f"{service}/v1/chat/completions",
            {"messages": QUESTION, "objective_weights": weights, "temperature": 0, "max_tokens": GREEDY_TOKENS, "return_token_ids": True},
        )
        assert status == 200, body
        # What vLLM read is the training-time rendering of these weights; what it wrote is the learner's greedy answer.
        assert body["prompt_token_ids"] == exported["prompts"][key]
        line = exported["card"].condition(QUESTION, exported["card"].weights(weights))[0]["content"]
        assert line in tokenizer.decode(body["prompt_token_ids"])
        assert body["choices"][0]["token_ids"] == exported["tokens"][key], key
        assert body["choices"][0]["finish_reason"] in ("length", "stop")


def test_stream_equals_plain_answer_for_greedy_decoding(service):
    request = {"messages": QUESTION, "objective_weights": WEIGHTS["mixed"], "temperature": 0, "max_tokens": 12}
    status, plain = _post(f"{service}/v1/chat/completions", request)
    assert status == 200, plain
    status, raw = _post(f"{service}/v1/chat/completions", {**request, "stream": True})
    assert status == 200
    events = [line.removeprefix("data: ") for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_refusals_over_http(service):
    url = f"{service}/v1/chat/completions"
    status, body = _post(url, {"messages": QUESTION}, token=None)
    assert status == 401
    status, body = _post(url, {"messages": QUESTION, "objective_weights": {"Helpfulness": 1.0}})
    assert status == 422 and "Helpfulness" in body["error"]["message"]
    status, body = _post(url, {"messages": QUESTION, "objective_weights": {"Relevance": 0.5}})
    assert status == 422 and "sum to 1" in body["error"]["message"]
    status, body = _post(url, {"messages": QUESTION, "max_tokens": 901})
    assert status == 422 and "max_tokens" in body["error"]["message"]
    status, body = _post(url, {"messages": [{"role": "user", "content": "x" * 5000}]})
    assert status == 413


def test_openai_client(service):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{service}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["policy"]
    answer = client.chat.completions.create(
        model="policy", messages=QUESTION, temperature=0, max_tokens=4, extra_body={"objective_weights": WEIGHTS["relevant"]}
    )
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens == 4


def _engine_status(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/healthz", timeout=30) as r:
        return json.loads(r.read())


def test_client_that_disconnects_mid_stream_frees_its_request(service):
    before = _engine_status(service)["aborted_requests"]
    host, port = service.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 900, "stream": True}
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    )
    response = connection.getresponse()
    assert response.status == 200
    # readline() on the response, not its socket file: the stream arrives chunk-encoded.
    assert response.readline().startswith(b"data: ")
    connection.close()
    deadline = time.monotonic() + 60
    while (status := _engine_status(service))["aborted_requests"] == before or status["active_requests"]:
        assert time.monotonic() < deadline, f"the engine still holds the request a minute after the client left: {status}"
        time.sleep(0.5)
    assert status["aborted_requests"] == before + 1 and status["active_requests"] == 0

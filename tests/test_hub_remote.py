"""Push and load patched models through the real huggingface_hub client over HTTP.

The server is tests/hub_server.py (the Hub's HTTP endpoints the client calls, on 127.0.0.1);
``test_live_hub`` runs against the real Hub when HF_PROPE_LIVE_TOKEN and HF_PROPE_LIVE_REPO are set.
"""

from __future__ import annotations

import os

import pytest
import torch
from hub_server import local_hub_fixture
from test_hub_local import lora_model
from tiny import HEAD_KEEP, MODEL_TYPES, logits, tokens

import hf_prope
from hf_prope.hub import PATCH_FILE

TOKEN = "hf_good"


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    yield from local_hub_fixture(monkeypatch, tmp_path / "hf-home")


def _commit_posts(hub) -> int:
    return sum(1 for method, path in hub.requests if method == "POST" and "/commit/" in path)


def _uploads(hub) -> list:
    return [
        (m, p)
        for m, p in hub.requests
        if m == "POST" and ("/commit/" in p or "/preupload/" in p or p.endswith("/create"))
    ]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("save_method", ["adapter", "merged"])
def test_push_and_load_round_trip(local_hub, model_type, save_method, tmp_path) -> None:
    model = lora_model(model_type, tmp_path / "base")
    ids = tokens()
    expected = logits(model, ids)
    repo = f"user/{model_type}-{save_method}"
    hf_prope.push_to_hub(model, repo, save_method=save_method, token=TOKEN, private=True)
    assert _commit_posts(local_hub) == 1  # one push, one commit
    assert local_hub.repo(repo).private
    files = set(local_hub.files(repo))
    assert "README.md" in files
    assert (PATCH_FILE in files) == (save_method == "adapter")
    loaded = hf_prope.from_pretrained(repo, token=TOKEN).eval()
    assert hf_prope.get_patch(loaded) == hf_prope.get_patch(model)
    if save_method == "adapter":
        assert torch.equal(logits(loaded, ids), expected)
    else:
        torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_revision_branch_message_and_pr(local_hub, tmp_path, monkeypatch) -> None:
    model = lora_model("llama", tmp_path / "base")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # token from the environment this time
    hf_prope.push_to_hub(model, "user/m", commit_message="first")
    hf_prope.patch_model(model, "nope", layers=[0])
    hf_prope.push_to_hub(model, "user/m", revision="nope-layer0", commit_message="layer 0 NoPE")
    assert local_hub.commits("user/m", "nope-layer0")[0].title == "layer 0 NoPE"
    assert local_hub.commits("user/m", "main")[0].title == "first"
    main = hf_prope.from_pretrained("user/m")
    branch = hf_prope.from_pretrained("user/m", revision="nope-layer0")
    assert hf_prope.get_patch(main).name == "p-rope"
    assert hf_prope.get_patch(branch) == hf_prope.PatchSpec("nope", layers=(0,))
    ids = tokens()
    assert torch.equal(logits(branch.eval(), ids), logits(model, ids))
    info = hf_prope.push_to_hub(model, "user/m", create_pr=True, commit_message="as a PR", save_method="merged")
    assert info.pr_url
    assert local_hub.commits("user/m", "main")[0].title == "first"  # main untouched by the PR


@pytest.mark.parametrize("token", [None, "hf_wrong"])
def test_missing_or_rejected_token_fails_before_any_upload(local_hub, tmp_path, token, capsys) -> None:
    model = lora_model("llama", tmp_path / "base")
    local_hub.clear_requests()
    with pytest.raises(PermissionError, match="missing or was rejected") as err:
        hf_prope.push_to_hub(model, "user/x", token=token)
    assert _uploads(local_hub) == []
    assert "hf_wrong" not in str(err.value) and "hf_wrong" not in capsys.readouterr().out


def test_repo_that_does_not_exist(local_hub) -> None:
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        hf_prope.from_pretrained("user/no-such-repo", token=TOKEN)


def test_interrupted_upload_leaves_repo_unchanged_and_retry_succeeds(local_hub, tmp_path) -> None:
    model = lora_model("llama", tmp_path / "base")
    hf_prope.push_to_hub(model, "user/r", token=TOKEN, commit_message="v1")
    before = local_hub.files("user/r")
    hf_prope.patch_model(model, "p-rope", p=0.5)
    local_hub.fail_next_commit(after_bytes=2048)
    with pytest.raises(ConnectionError, match="repo is unchanged"):
        hf_prope.push_to_hub(model, "user/r", token=TOKEN, commit_message="v2")
    assert local_hub.files("user/r") == before
    hf_prope.push_to_hub(model, "user/r", token=TOKEN, commit_message="v2")
    assert local_hub.commits("user/r")[0].title == "v2"
    assert hf_prope.get_patch(hf_prope.from_pretrained("user/r", token=TOKEN)) == hf_prope.PatchSpec("p-rope", p=0.5)


def test_push_through_the_xet_pipeline(monkeypatch, tmp_path) -> None:
    """With hf_xet installed (the default), upload_folder takes another path; it must work too."""
    gen = local_hub_fixture(monkeypatch, tmp_path / "hf-home", xet=True)
    hub = next(gen)
    try:
        model = lora_model("qwen3", tmp_path / "base")
        hf_prope.push_to_hub(model, "user/x", token=TOKEN)
        loaded = hf_prope.from_pretrained("user/x", token=TOKEN).eval()
        ids = tokens()
        assert torch.equal(logits(loaded, ids), logits(model, ids))
        assert _commit_posts(hub) == 1
    finally:
        gen.close()


@pytest.mark.skipif(
    not (os.environ.get("HF_PROPE_LIVE_TOKEN") and os.environ.get("HF_PROPE_LIVE_REPO")),
    reason="live Hub test: set HF_PROPE_LIVE_TOKEN and HF_PROPE_LIVE_REPO (a repo id you can write) to run it",
)
def test_live_hub(tmp_path) -> None:
    token, repo = os.environ["HF_PROPE_LIVE_TOKEN"], os.environ["HF_PROPE_LIVE_REPO"]
    model = lora_model("llama", tmp_path / "base")
    hf_prope.push_to_hub(model, repo, token=token, private=True, save_method="merged")
    loaded = hf_prope.from_pretrained(repo, token=token).eval()
    ids = tokens()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save_method", ["adapter", "merged"])
def test_head_mask_push_and_load_round_trip(local_hub, save_method, tmp_path) -> None:
    model = lora_model("qwen3", tmp_path / "base", ("head-mask", {"head_keep": HEAD_KEEP}))
    ids = tokens()
    expected = logits(model, ids)
    hf_prope.push_to_hub(model, "user/heads", save_method=save_method, token=TOKEN)
    loaded = hf_prope.from_pretrained("user/heads", token=TOKEN).eval()
    assert hf_prope.get_patch(loaded) == hf_prope.get_patch(model) and hf_prope.get_patch(model).is_per_head
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
    hf_prope.unpatch_model(loaded)  # the same weights with plain RoPE are far: the check can fail
    assert (logits(loaded, ids) - expected).abs().max() > 1e-3


def test_plain_peft_load_from_the_hub_restores_the_patch_from_the_cache(local_hub, tmp_path, monkeypatch) -> None:
    """The record is read from what PEFT's own download left in the cache: no request of hf-prope's own."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = lora_model("llama", tmp_path / "base")
    ids = tokens()
    hf_prope.push_to_hub(model, "user/a", save_method="adapter")
    plain_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    before = list(local_hub.requests)
    loaded = PeftModel.from_pretrained(plain_base, "user/a").eval()
    fetched = [p for m, p in local_hub.requests[len(before) :] if PATCH_FILE in p]
    assert not fetched, fetched  # the record came from the weights' metadata PEFT downloaded
    assert hf_prope.get_patch(plain_base) == hf_prope.get_patch(model)
    assert torch.equal(logits(loaded, ids), logits(model, ids))

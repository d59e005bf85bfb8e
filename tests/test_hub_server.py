"""The local Hub stand-in (``hub_server.py``), exercised through the real ``huggingface_hub`` client."""

from __future__ import annotations

import importlib
import importlib.util
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hub_server import LocalHub, git_blob_sha1, local_hub_env, local_hub_fixture
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_token,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._runtime import is_xet_available

# huggingface_hub >= 2 talks through httpx2, 1.x through httpx; an environment may hold both.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = ()
for _name in ("httpx2", "httpx"):
    try:
        _TRANSPORT_ERRORS += (importlib.import_module(_name).TransportError,)
    except ImportError:
        pass

GOOD = "hf_good"
HAS_XET = importlib.util.find_spec("hf_xet") is not None


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    yield from local_hub_fixture(monkeypatch, tmp_path, read_tokens={"hf_read"})


@pytest.fixture(params=[False, True], ids=["create_commit", "xet_pipeline"])
def any_hub(request, monkeypatch, tmp_path):
    """Both upload paths of ``upload_folder``: Xet disabled, and as installed (pipelined upload)."""
    if request.param and not HAS_XET:
        pytest.skip("hf_xet is not installed: upload_folder always uses create_commit")
    for hub in local_hub_fixture(monkeypatch, tmp_path, xet=request.param):
        assert is_xet_available() is request.param  # decides which upload path upload_folder takes
        yield hub


def make_folder(root: Path, version: int = 1) -> dict[str, bytes]:
    files = {
        "config.json": b'{"version": %d}' % version,
        "README.md": b"---\nlicense: apache-2.0\n---\n# Model %d\n" % version,
        "weights/model.safetensors": bytes(range(256)) * 8 + bytes([version]),
        "weights/empty.txt": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def read_tree(folder: str | Path) -> dict[str, bytes]:
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def posts(hub: LocalHub, action: str) -> list[str]:
    return [path for method, path in hub.requests if method == "POST" and f"/{action}/" in path]


def test_client_points_at_local_hub(local_hub) -> None:
    assert constants.ENDPOINT == local_hub.endpoint
    assert hf_hub_url("user/x", "config.json").startswith(local_hub.endpoint + "/")
    assert HfApi().endpoint == local_hub.endpoint
    assert get_token() is None
    import huggingface_hub

    assert huggingface_hub.whoami(token=GOOD)["name"] == "user"  # module-level HfApi
    assert local_hub.requests == [("GET", "/api/whoami-v2")]


def test_private_upload_is_one_commit_and_downloads_identically(any_hub, tmp_path) -> None:
    api = HfApi(token=GOOD)
    repo_url = api.create_repo("user/model", private=True)
    assert repo_url.repo_id == "user/model" and repo_url.startswith(any_hub.endpoint)
    assert api.repo_info("user/model").private is True
    files = make_folder(tmp_path / "src")
    any_hub.clear_requests()

    info = api.upload_folder(repo_id="user/model", folder_path=tmp_path / "src", commit_message="push")

    assert len(posts(any_hub, "commit")) == 1 and len(posts(any_hub, "preupload")) == 1
    assert not [path for _, path in any_hub.requests if "xet" in path or "lfs" in path]
    assert [c.title for c in any_hub.commits("user/model")] == ["push", "initial commit"]
    assert info.oid == any_hub.commits("user/model")[0].oid
    assert {k: v for k, v in any_hub.files("user/model").items() if k != ".gitattributes"} == files
    assert sorted(api.list_repo_files("user/model")) == sorted([".gitattributes", *files])

    path = snapshot_download("user/model", token=GOOD)
    assert Path(path).name == info.oid
    downloaded = read_tree(path)
    assert downloaded.pop(".gitattributes").startswith(b"*.bin filter=lfs")
    assert downloaded == files
    one = hf_hub_download("user/model", "weights/model.safetensors", token=GOOD, force_download=True)
    assert Path(one).read_bytes() == files["weights/model.safetensors"]

    with pytest.raises(RepositoryNotFoundError):  # private: no token, no access
        hf_hub_download("user/model", "config.json", cache_dir=tmp_path / "anon")
    assert not HfApi().repo_exists("user/model") and api.repo_exists("user/model")


def test_create_repo_conflict_and_exist_ok(local_hub) -> None:
    api = HfApi(token=GOOD)
    api.create_repo("user/twice")
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("user/twice")
    assert err.value.response.status_code == 409
    assert api.create_repo("user/twice", exist_ok=True).repo_id == "user/twice"
    assert api.create_repo("noname").repo_id == "user/noname"  # no namespace: the token's user
    api.delete_repo("user/twice")
    assert not api.repo_exists("user/twice")
    api.delete_repo("user/twice", missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("user/twice")


def test_dataset_and_space_repos(local_hub) -> None:
    api = HfApi(token=GOOD)
    api.create_repo("user/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="train.csv", repo_id="user/data", repo_type="dataset")
    got = hf_hub_download("user/data", "train.csv", repo_type="dataset")
    assert Path(got).read_bytes() == b"a,b\n1,2\n"
    assert api.dataset_info("user/data").sha == local_hub.commits("user/data", repo_type="dataset")[0].oid
    api.create_repo("user/site", repo_type="space", space_sdk="static")
    api.upload_file(path_or_fileobj=b"<p/>", path_in_repo="index.html", repo_id="user/site", repo_type="space")
    assert Path(hf_hub_download("user/site", "index.html", repo_type="space")).read_bytes() == b"<p/>"
    assert not api.repo_exists("user/data")  # a model of that name does not exist


def test_revision_on_a_new_branch(any_hub, tmp_path) -> None:
    api = HfApi(token=GOOD)
    api.create_repo("user/branchy")
    v1 = make_folder(tmp_path / "v1", 1)
    v2 = make_folder(tmp_path / "v2", 2)
    first = api.upload_folder(repo_id="user/branchy", folder_path=tmp_path / "v1")
    api.create_branch("user/branchy", branch="dev")
    api.create_branch("user/branchy", branch="dev", exist_ok=True)
    second = api.upload_folder(repo_id="user/branchy", folder_path=tmp_path / "v2", revision="dev")

    assert {r.name: r.target_commit for r in api.list_repo_refs("user/branchy").branches} == {
        "main": first.oid,
        "dev": second.oid,
    }
    read = lambda rev: Path(hf_hub_download("user/branchy", "config.json", revision=rev)).read_bytes()  # noqa: E731
    assert read("main") == v1["config.json"] and read("dev") == v2["config.json"]
    assert read(first.oid) == v1["config.json"] and read(second.oid) == v2["config.json"]
    assert (
        read_tree(snapshot_download("user/branchy", revision="dev"))["weights/model.safetensors"]
        == (v2["weights/model.safetensors"])
    )
    assert api.model_info("user/branchy", revision="dev").sha == second.oid
    # Only the changed files went into the branch commit (preupload returned the remote oids).
    assert len(any_hub.commits("user/branchy", "dev")) == 3

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/branchy", "config.json", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("user/branchy", "missing.txt", revision="dev")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("user/branchy", revision="nope")


def test_create_pr(any_hub, tmp_path) -> None:
    api = HfApi(token=GOOD)
    api.create_repo("user/pr")
    v1 = make_folder(tmp_path / "v1", 1)
    v2 = make_folder(tmp_path / "v2", 2)
    base = api.upload_folder(repo_id="user/pr", folder_path=tmp_path / "v1")

    info = api.upload_folder(repo_id="user/pr", folder_path=tmp_path / "v2", create_pr=True, commit_message="PR")

    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert info.pr_url == f"{any_hub.endpoint}/user/pr/discussions/1"
    assert api.model_info("user/pr").sha == base.oid  # main untouched
    assert any_hub.files("user/pr")["config.json"] == v1["config.json"]
    assert any_hub.files("user/pr", "refs/pr/1")["config.json"] == v2["config.json"]
    pr_file = hf_hub_download("user/pr", "config.json", revision="refs/pr/1")
    assert Path(pr_file).read_bytes() == v2["config.json"]
    refs = api.list_repo_refs("user/pr", include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]
    # The Xet pipeline opens the PR first (POST /discussions), create_commit uses ?create_pr=1.
    assert len(posts(any_hub, "commit")) == 2


def test_rejected_token_fails_before_any_upload(local_hub, tmp_path) -> None:
    api = HfApi(token=GOOD)
    api.create_repo("user/guarded")
    make_folder(tmp_path / "src")
    local_hub.clear_requests()

    bad = HfApi(token="hf_bad")
    with pytest.raises(HfHubHTTPError) as err:
        bad.whoami()
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        bad.upload_folder(repo_id="user/guarded", folder_path=tmp_path / "src")
    assert err.value.response.status_code == 401
    assert posts(local_hub, "commit") == [] and posts(local_hub, "preupload") == []

    with pytest.raises(LocalTokenNotFoundError):  # no token at all: refused client-side
        HfApi().whoami()
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().create_repo("user/anon")
    assert err.value.response.status_code == 401

    reader = HfApi(token="hf_read")
    assert reader.whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as err:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="user/guarded")
    assert err.value.response.status_code == 403
    assert posts(local_hub, "commit") == []
    assert [c.title for c in local_hub.commits("user/guarded")] == ["initial commit"]


def test_missing_repo_raises_repository_not_found(local_hub, tmp_path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/does-not-exist", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=GOOD).model_info("user/does-not-exist")
    assert not HfApi().repo_exists("user/does-not-exist")


def test_commit_is_atomic_and_checks_parent(local_hub) -> None:
    api = HfApi(token=GOOD)
    api.create_repo("user/atomic")
    first = api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id="user/atomic")
    before = local_hub.files("user/atomic")

    with pytest.raises(RemoteEntryNotFoundError):  # the add must not land without the delete
        api.create_commit(
            "user/atomic",
            [CommitOperationAdd("b.txt", b"b"), CommitOperationDelete("nope.txt")],
            commit_message="half",
        )
    api.upload_file(path_or_fileobj=b"c", path_in_repo="dir/c.txt", repo_id="user/atomic")
    assert [(f.path, f.size) for f in api.list_repo_tree("user/atomic", path_in_repo="dir")] == [("dir/c.txt", 1)]
    with pytest.raises(HfHubHTTPError) as err:  # main moved since `first`
        api.create_commit(
            "user/atomic", [CommitOperationAdd("b.txt", b"b")], commit_message="stale", parent_commit=first.oid
        )
    assert err.value.response.status_code == 412
    assert local_hub.files("user/atomic") == {**before, "dir/c.txt": b"c"}

    api.create_commit("user/atomic", [CommitOperationDelete("dir/")], commit_message="rm dir")
    assert local_hub.files("user/atomic") == before
    tree = {f.path: f.blob_id for f in api.list_repo_tree("user/atomic")}
    assert tree["a.txt"] == git_blob_sha1(b"a")


def test_interrupted_commit_leaves_repo_unchanged_and_retry_succeeds(local_hub, tmp_path) -> None:
    api = HfApi(token=GOOD)
    api.create_repo("user/flaky")
    v1 = make_folder(tmp_path / "v1", 1)
    v2 = make_folder(tmp_path / "v2", 2)
    api.upload_folder(repo_id="user/flaky", folder_path=tmp_path / "v1")
    before = local_hub.files("user/flaky")
    commits_before = len(local_hub.commits("user/flaky"))

    local_hub.fail_next_commit(after_bytes=100)
    with pytest.raises(_TRANSPORT_ERRORS):  # the connection dropped: no HTTP answer at all
        api.upload_folder(repo_id="user/flaky", folder_path=tmp_path / "v2")
    assert local_hub.dropped_commits == 1
    assert local_hub.files("user/flaky") == before
    assert len(local_hub.commits("user/flaky")) == commits_before
    assert sorted(api.list_repo_files("user/flaky")) == sorted(before)
    got = hf_hub_download("user/flaky", "config.json", force_download=True)
    assert Path(got).read_bytes() == v1["config.json"]

    api.upload_folder(repo_id="user/flaky", folder_path=tmp_path / "v2")
    assert len(local_hub.commits("user/flaky")) == commits_before + 1
    assert read_tree(snapshot_download("user/flaky")) == {**v2, ".gitattributes": before[".gitattributes"]}


@pytest.mark.skipif(not HAS_XET, reason="the pipelined upload needs hf_xet")
def test_xet_pipeline_retries_an_interrupted_commit_by_itself(monkeypatch, tmp_path) -> None:
    """With hf_xet installed, upload_folder re-sends a dropped commit POST (after 1 s): one commit lands."""
    with local_hub_env(monkeypatch, tmp_path, xet=True) as hub:
        api = HfApi(token=GOOD)
        api.create_repo("user/retry")
        files = make_folder(tmp_path / "src")
        hub.fail_next_commit()
        api.upload_folder(repo_id="user/retry", folder_path=tmp_path / "src")
        assert hub.dropped_commits == 1 and len(posts(hub, "commit")) == 2
        assert [c.title for c in hub.commits("user/retry")][1:] == ["initial commit"]
        assert {k: v for k, v in hub.files("user/retry").items() if k != ".gitattributes"} == files


def test_transformers_shared_hfapi_follows_each_server(monkeypatch, tmp_path) -> None:
    """transformers caches one HfApi (with its endpoint) in transformers.utils.hub._hf_api."""
    transformers_hub = pytest.importorskip("transformers.utils.hub")
    if not hasattr(transformers_hub, "hf_api"):
        pytest.skip("this transformers keeps no shared HfApi")
    for i in range(2):
        with monkeypatch.context() as mp:
            with local_hub_env(mp, tmp_path / str(i)) as hub:
                assert transformers_hub.hf_api().endpoint == hub.endpoint
            assert getattr(transformers_hub._hf_api, "endpoint", None) != hub.endpoint


def test_server_stops_cleanly() -> None:
    def server_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == "local-hub" or "process_request" in t.name]

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no client, no proxy
    with LocalHub(tokens={"hf_x": "alice"}) as hub:
        assert hub.endpoint.startswith("http://127.0.0.1:")
        assert server_threads()
        request = urllib.request.Request(hub.endpoint + "/api/whoami-v2", headers={"Authorization": "Bearer hf_x"})
        with opener.open(request, timeout=5) as response:
            assert json.load(response)["name"] == "alice"
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(hub.endpoint + "/api/whoami-v2", timeout=5)
        assert err.value.code == 401
    assert server_threads() == []
    assert hub.requests == [("GET", "/api/whoami-v2")] * 2

"""The Hub stand-in (`tests/helpers/hub_standin.py`) drives the real huggingface_hub client, offline.

Each test gets a fresh `HubStandin` on loopback serving small random repos from tmp_path, with
huggingface_hub pointed at it by `hub.point_huggingface_hub(monkeypatch, hf_home)`: env vars for
subprocesses, and the import-time `huggingface_hub.constants` (ENDPOINT, URL template, cache
paths, offline flag, Xet off) monkeypatched for this process, plus a client hook that refuses any
host but loopback. Nothing here can reach huggingface.co or Xet storage.
"""

import os
import random
import re
import subprocess
import sys

import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from helpers.hub_standin import HubStandin

REPO = "test-org/tiny-model"
GATED = "test-org/gated-model"
TOKEN = "hf_standin_test_token"


def _repo_folder(root, seed):
    """A small model repo: git-sized config/tokenizer files and LFS-sized (>= 10 KiB) weights."""
    rng = random.Random(seed)
    files = {
        "config.json": b'{"model_type": "mistral", "hidden_size": 64}\n',
        "README.md": b"# tiny\n",
        "tokenizer.model": rng.randbytes(5_000),
        "model.safetensors": rng.randbytes(1_000_000),
        "extra/optimizer.pt": rng.randbytes(200_000),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def sources(tmp_path):
    return {REPO: _repo_folder(tmp_path / "src_public", 0), GATED: _repo_folder(tmp_path / "src_gated", 1)}


@pytest.fixture
def hub(sources, tmp_path, monkeypatch):
    with HubStandin(sources, gated={GATED}, tokens={TOKEN}) as hub:
        hub.point_huggingface_hub(monkeypatch, tmp_path / "hf_home")
        yield hub
        huggingface_hub.close_session()  # close this test's pooled connections to the stand-in
        assert hub.escaped == [], "huggingface_hub tried to leave loopback"


def _same_bytes(path, source):
    with open(path, "rb") as got, open(source, "rb") as want:
        return got.read() == want.read()


def test_snapshot_download_fetches_exactly_the_allowed_files(hub, sources):
    path = snapshot_download(REPO, allow_patterns=["*.json", "*.safetensors"])

    assert sorted(hub.downloads()) == [(REPO, "config.json"), (REPO, "model.safetensors")]
    assert sorted(hub.downloads("HEAD")) == [(REPO, "config.json"), (REPO, "model.safetensors")]
    for name in ("config.json", "model.safetensors"):
        assert _same_bytes(os.path.join(path, name), sources[REPO] / name)
    assert not os.path.exists(os.path.join(path, "tokenizer.model"))
    # The folder is the snapshot of the commit the repo-info API reported.
    assert os.path.basename(path) == hub.repos[REPO].sha
    assert hub.unexpected == []
    # 2.5.0: repo info for "main", then the tree at the commit, then HEAD+GET per matching file.
    api_paths = [r.path for r in hub.hub_requests() if r.path.startswith("/api/")]
    assert api_paths[0] == f"/api/models/{REPO}/revision/main"


def test_interrupted_download_resumes_with_a_range_request(hub, sources, monkeypatch, tmp_path):
    # huggingface_hub writes the body in DOWNLOAD_CHUNK_SIZE pieces (10 MiB); bytes of a partial
    # piece are lost when the connection drops, so with 1 MB files a cut restarts from 0. Smaller
    # pieces make the resume visible.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    cut = 300_000
    hub.cut_after("model.safetensors", cut)

    try:
        path = hf_hub_download(REPO, "model.safetensors")
    except Exception:
        # Older clients give up here and keep `<blob>.incomplete` for the next call to resume;
        # huggingface_hub 2.x retries inside the same call (and removes its temporary on failure).
        path = hf_hub_download(REPO, "model.safetensors")

    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert len(gets) == 2, gets
    assert gets[0].range is None
    resumed_at = re.fullmatch(r"bytes=(\d+)-", gets[1].range or "")
    assert resumed_at and 0 < int(resumed_at.group(1)) <= cut, gets[1]
    assert _same_bytes(path, sources[REPO] / "model.safetensors")
    blobs = tmp_path / "hf_home" / "hub" / "models--test-org--tiny-model" / "blobs"
    assert [p.name for p in blobs.iterdir() if p.name.endswith(".incomplete")] == []
    assert hub.unexpected == []


def test_offline_serves_from_cache_with_no_requests(hub, sources, monkeypatch):
    online = snapshot_download(REPO, allow_patterns=["config.json", "tokenizer.model"])
    hub.clear_requests()

    # local_files_only: no request even though the Hub is reachable.
    assert snapshot_download(REPO, allow_patterns=["config.json"], local_files_only=True) == online
    assert hf_hub_download(REPO, "tokenizer.model", local_files_only=True) == os.path.join(online, "tokenizer.model")
    assert hub.requests == []

    # HF_HUB_OFFLINE=1: huggingface_hub read it at import, so patch the constant it consults.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert snapshot_download(REPO, allow_patterns=["config.json", "tokenizer.model"]) == online
    path = hf_hub_download(REPO, "config.json")
    assert _same_bytes(path, sources[REPO] / "config.json")
    with pytest.raises(LocalEntryNotFoundError):  # never downloaded: offline really means cache only
        hf_hub_download(REPO, "model.safetensors")
    assert hub.requests == []


@pytest.mark.parametrize("gate_metadata", [False, True], ids=["files-gated", "api-gated-too"])
def test_gated_repo_needs_a_token(hub, sources, gate_metadata):
    hub.gate_metadata = gate_metadata  # huggingface.co keeps the info/tree of a gated repo public

    with pytest.raises(GatedRepoError) as anonymous:
        snapshot_download(GATED, allow_patterns=["config.json"])
    assert anonymous.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as refused:
        hf_hub_download(GATED, "config.json", token="hf_not_granted")
    assert refused.value.response.status_code == 403
    assert hub.downloads() == []  # refused at HEAD: no file body ever left the stand-in

    path = snapshot_download(GATED, allow_patterns=["config.json", "*.safetensors"], token=TOKEN)
    for name in ("config.json", "model.safetensors"):
        assert _same_bytes(os.path.join(path, name), sources[GATED] / name)
    assert hub.unexpected == []


def test_unknown_repo_revision_and_file(hub):
    with pytest.raises(RepositoryNotFoundError) as repo_error:
        snapshot_download("test-org/no-such-model")
    assert not isinstance(repo_error.value, GatedRepoError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-org/no-such-model", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v9.9")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "no_such_file.bin")
    assert hub.unexpected == []


def test_model_info_api_and_commit_revision(hub, sources):
    repo = hub.repos[REPO]
    info = HfApi().model_info(REPO, files_metadata=True)
    assert info.id == REPO and info.sha == repo.sha and info.gated is False
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes == {p.relative_to(sources[REPO]).as_posix(): p.stat().st_size
                     for p in sources[REPO].rglob("*") if p.is_file()}
    assert HfApi().model_info(GATED).gated == "manual"
    assert sorted(HfApi().list_repo_files(REPO, revision=repo.sha)) == sorted(sizes)
    # The commit sha resolves like "main" does.
    path = hf_hub_download(REPO, "config.json", revision=repo.sha)
    assert _same_bytes(path, sources[REPO] / "config.json")
    assert hub.unexpected == []


def test_lfs_redirect_to_a_cdn_origin(sources, tmp_path, monkeypatch):
    """As on huggingface.co: /resolve of a weight file 302s to another origin, fetched without auth."""
    with HubStandin(sources, gated={GATED}, tokens={TOKEN}, lfs_redirect=True) as hub:
        hub.point_huggingface_hub(monkeypatch, tmp_path / "hf_home")
        try:
            path = hf_hub_download(GATED, "model.safetensors", token=TOKEN)
        finally:
            huggingface_hub.close_session()
        assert _same_bytes(path, sources[GATED] / "model.safetensors")
        assert [r.path.split("?")[0] for r in hub.requests] == [
            f"/{GATED}/resolve/main/model.safetensors",  # HEAD: 302 + X-Linked-Etag/Size
            "/_cdn/test-org%2Fgated-model/-/model.safetensors",  # GET on the "CDN" port
        ]
        # The blob is named by the sha256 the Hub reports for LFS files.
        assert os.path.basename(os.path.realpath(path)) == hub.repos[GATED].files["model.safetensors"].sha256
        assert hub.unexpected == [] and hub.escaped == []


def test_http_level_range_tree_and_unexpected_routes(hub, sources):
    """The wire details the client relies on, checked directly (httpx, no huggingface_hub)."""
    import httpx

    data = (sources[REPO] / "model.safetensors").read_bytes()
    url = f"{hub.endpoint}/{REPO}/resolve/main/model.safetensors"
    with httpx.Client(timeout=10) as client:
        head = client.head(url)
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
        assert head.headers["X-Repo-Commit"] == hub.repos[REPO].sha
        assert head.headers["ETag"].strip('"') == hub.repos[REPO].files["model.safetensors"].sha256
        assert not any(h.lower().startswith("x-xet") for h in head.headers)  # never steer to Xet
        part = client.get(url, headers={"Range": "bytes=1000-"})
        assert part.status_code == 206 and part.content == data[1000:]
        assert part.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert client.get(url, headers={"Range": "bytes=10-19"}).content == data[10:20]
        assert client.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416

        tree = client.get(f"{hub.endpoint}/api/models/{REPO}/tree/main/extra").json()
        assert [(e["type"], e["path"]) for e in tree] == [("file", "extra/optimizer.pt")]
        top = client.get(f"{hub.endpoint}/api/models/{REPO}/tree/main").json()
        assert {e["path"] for e in top} == {"extra", "README.md", "config.json", "model.safetensors",
                                            "tokenizer.model"}

        assert hub.unexpected == []
        odd = client.post(f"{hub.endpoint}/api/models/{REPO}/paths-info/main", json={"paths": []})
        assert odd.status_code == 404
        assert [(r.method, r.path) for r in hub.unexpected] == [("POST", f"/api/models/{REPO}/paths-info/main")]


def test_a_subprocess_finds_the_standin_through_env(hub, sources, tmp_path):
    """How a product process (e.g. the server given a Hub id) is pointed here: `hub.env(hf_home)`."""
    code = ("import sys, huggingface_hub as h; "
            "print(h.snapshot_download(sys.argv[1], allow_patterns=['config.json']))")
    env = {**os.environ, **hub.env(tmp_path / "child_home")}
    out = subprocess.run([sys.executable, "-c", code, REPO], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    snapshot = out.stdout.strip().splitlines()[-1]
    assert snapshot.startswith(str(tmp_path / "child_home" / "hub"))
    assert _same_bytes(os.path.join(snapshot, "config.json"), sources[REPO] / "config.json")
    assert hub.downloads() == [(REPO, "config.json")] and hub.unexpected == []

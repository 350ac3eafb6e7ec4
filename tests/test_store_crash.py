"""Kill a publishing process at random moments: the store must always load, with no partial
version (both backends: a folder's rename, a database's transaction)."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prompt_store import FolderStore, open_store

pytestmark = pytest.mark.processes

KILLS = 25


def test_killed_publisher_never_leaves_partial_version(store_location):
    root = Path(store_location)
    rng = random.Random(1234)
    script = Path(__file__).with_name("store_publisher.py")
    repo = Path(__file__).resolve().parents[1]
    seen_versions = 0
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, str(script), store_location], stdout=subprocess.PIPE, cwd=repo)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait()

        with open_store(store_location) as store:
            versions = store.versions("crash") if "crash" in store.names() else []
            for version in versions:
                loaded = store.load(version)  # checksum, shape and finiteness all verified
                assert loaded.embeddings.shape == (256, 64)
            numbers = [v.id.version for v in versions]
            assert numbers == list(range(1, len(numbers) + 1))
            assert store._version_numbers("crash", include_deleted=True) == numbers  # no half-written rows or folders
            if isinstance(store, FolderStore):  # nothing but complete version folders under the name
                name_dir = root / "prompts" / "crash"
                if name_dir.exists():
                    assert sorted(p.name for p in name_dir.iterdir()) == sorted(f"v{n}" for n in numbers)
        seen_versions = len(numbers)
    assert seen_versions > 0, "the publisher never got a version out; the test killed it too early"
    with open_store(store_location) as store:
        store.collect_garbage()
        if isinstance(store, FolderStore):
            assert list((root / ".tmp").iterdir()) == []

"""edgefc.memory.release_memory: a full collection only where the process is large enough for it to matter."""

from edgefc import memory


def test_release_memory_collects_only_above_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(memory.gc, "collect", lambda *a: calls.append("collect") or 0)
    for rss, collected in ((memory.RELEASE_ABOVE_BYTES - 1, False), (memory.RELEASE_ABOVE_BYTES, True),
                           (0, True)):   # 0: the size cannot be read (no /proc): collect as before
        calls.clear()
        monkeypatch.setattr(memory, "resident_bytes", lambda rss=rss: rss)
        memory.release_memory()
        assert calls == (["collect"] if collected else []), rss


def test_resident_bytes_reads_this_process():
    assert memory.resident_bytes() > 10 << 20   # a Python process with numpy and onnx loaded

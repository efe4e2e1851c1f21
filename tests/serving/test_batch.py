"""``int8mt translate --ray`` on a local Ray: the batch job keeps every line, in input order, equal
to the single-process output, and refuses what cannot run."""
import pytest

pytest.importorskip("ray.data")

from int8mt.cli import main  # noqa: E402
from int8mt.runtime.options import SearchOptions  # noqa: E402
from int8mt.runtime.translator import Translator  # noqa: E402
from tests.conftest import DATA_DIR  # noqa: E402

SENTENCES = (DATA_DIR / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[:40]


def test_batch_job_keeps_every_line_in_order(ray_local, tiny_bundle, tmp_path):
    lines = [SENTENCES[i % len(SENTENCES)] for i in range(2000)]
    lines[5] = lines[1999] = ""
    lines[7] = "a line\u2028with a separator\x0cinside"
    source = tmp_path / "corpus.en"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["translate", str(tiny_bundle), "-i", str(source), "-o", str(tmp_path / "ray.de"), "--ray",
                 "--beam", "2"]) == 0
    assert main(["translate", str(tiny_bundle), "-i", str(source), "-o", str(tmp_path / "local.de"),
                 "--beam", "2"]) == 0
    on_ray = (tmp_path / "ray.de").read_text(encoding="utf-8").split("\n")
    assert len(on_ray) == 2001 and on_ray[-1] == ""
    assert on_ray == (tmp_path / "local.de").read_text(encoding="utf-8").split("\n")
    assert on_ray[5] == on_ray[1999] == ""


def test_batch_job_on_a_folder(ray_local, tiny_bundle, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    (src / "a.en").write_text("\n".join(SENTENCES[:5]) + "\n", encoding="utf-8")
    (src / "sub" / "b.en").write_text("\n".join(SENTENCES[5:8]) + "\n", encoding="utf-8")
    (src / "empty.en").write_text("", encoding="utf-8")
    (src / ".hidden").write_text("not translated\n", encoding="utf-8")
    assert main(["translate", str(tiny_bundle), "-i", str(src), "-o", str(tmp_path / "out"), "--ray",
                 "--workers", "1", "--threads", "2", "--beam", "1"]) == 0
    translator = Translator(tiny_bundle, SearchOptions(beam_size=1))
    assert (tmp_path / "out" / "a.en").read_text(encoding="utf-8").splitlines() == translator.translate(SENTENCES[:5])
    assert (tmp_path / "out" / "sub" / "b.en").read_text(encoding="utf-8").splitlines() == \
        translator.translate(SENTENCES[5:8])
    assert (tmp_path / "out" / "empty.en").read_text() == ""
    assert not (tmp_path / "out" / ".hidden").exists()


@pytest.mark.parametrize("extra, says", [
    (["--workers", "3", "--threads", "2"], "need 6 CPUs"),
    (["--beam", "0"], "beam size must be at least 1"),
    (["--workers", "0"], "workers must be at least 1, got 0"),
    (["--threads", "0"], "threads per worker must be at least 1, got 0"),
])
def test_batch_job_refuses_what_cannot_run(ray_local, tiny_bundle, tmp_path, capsys, extra, says):
    source = tmp_path / "in.en"
    source.write_text("A dog.\n")
    assert main(["translate", str(tiny_bundle), "-i", str(source), "-o", str(tmp_path / "out.de"), "--ray",
                 *extra]) == 2
    assert says in capsys.readouterr().err


def test_interrupted_job_says_how_far_it_got(ray_local, tiny_bundle, tmp_path, monkeypatch, capsys):
    import int8mt.serving.batch as batch

    class StopAfterFirstBlock(batch.tqdm):
        def update(self, n=1):
            super().update(n)
            raise KeyboardInterrupt

    monkeypatch.setattr(batch, "tqdm", StopAfterFirstBlock)
    source = tmp_path / "in.en"
    source.write_text("\n".join(SENTENCES * 20) + "\n", encoding="utf-8")  # 800 lines: several blocks
    assert main(["translate", str(tiny_bundle), "-i", str(source), "-o", str(tmp_path / "out.de"), "--ray",
                 "--workers", "1", "--beam", "1"]) == 130
    written = (tmp_path / "out.de").read_text(encoding="utf-8").splitlines()
    assert f"stopped after {len(written)} of 800 lines" in capsys.readouterr().err
    assert 0 < len(written) < 800
    assert written == Translator(tiny_bundle, SearchOptions(beam_size=1)).translate(SENTENCES * 20)[:len(written)]

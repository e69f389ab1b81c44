"""Tests for transcoder.engine.progress: the parsers of encoder progress output."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from transcoder.engine.progress import MAX_LINE, FfmpegProgress, MencoderProgress


def _pos(seconds: float, frame: int, percent: int) -> bytes:
    return b"Pos: %5.1fs %6df (%2d%%) 184.05fps Trem:   0min   3mb  A-V:0.000 [0:0]\r" % (
        seconds,
        frame,
        percent,
    )


MENCODER_RUN = (
    b"MEncoder UNKNOWN-12 (C) 2000-2023 MPlayer Team\n"
    b"VIDEO:  [H264]  320x240  24bpp  25.000 fps\n"
    + b"".join(_pos(i / 10, i, 17 + i // 2) for i in range(0, 121, 7))
    + b"\nFlushing video frames.\nWriting index...\n"
)


def _block(out_time_us: str, progress: str = "continue") -> bytes:
    return (
        b"frame=10\nfps=0.0\nstream_0_0_q=-1.0\nbitrate=N/A\ntotal_size=48\n"
        b"out_time_us=%s\nout_time_ms=%s\nout_time=N/A\ndup_frames=0\n"
        b"drop_frames=0\nspeed=N/A\nprogress=%s\n"
        % (out_time_us.encode(), out_time_us.encode(), progress.encode())
    )


FFMPEG_RUN = (
    _block("N/A")
    + _block("-23220")
    + _block("1500000")
    + _block("3000000")
    + _block("6000000", "end")
)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def _feed_all(parser: MencoderProgress | FfmpegProgress, chunks: list[bytes]) -> list[float]:
    values = []
    for chunk in chunks:
        value = parser.feed(chunk)
        if value is not None:
            values.append(value)
    return values


def test_mencoder_position_over_duration() -> None:
    """With a known duration the percentage is Pos seconds over it, not the (NN%) figure."""
    p = MencoderProgress(duration=40.0)
    assert p.feed(_pos(12.3, 308, 28)) == 12.3 / 40.0 * 100


def test_mencoder_byte_percentage_without_duration() -> None:
    """Without a duration the (NN%) figure is the fallback."""
    p = MencoderProgress(duration=None)
    assert p.feed(_pos(12.3, 308, 28)) == 28.0


def test_mencoder_unusable_duration_falls_back() -> None:
    """A zero, negative or non-finite duration counts as unknown."""
    for duration in (0.0, -3.0, float("nan"), float("inf")):
        assert MencoderProgress(duration).feed(_pos(1.0, 25, 61)) == 61.0


def test_mencoder_duration_learnt_later() -> None:
    """A duration set after the start (the probe answered) turns the byte figure into Pos over it."""
    p = MencoderProgress(duration=None)
    assert p.feed(_pos(1.0, 25, 17)) == 17.0
    p.duration = 20.0
    assert p.duration == 20.0
    assert p.feed(_pos(2.0, 50, 18)) == 10.0
    p.duration = float("nan")
    assert p.duration is None
    assert p.feed(_pos(3.0, 75, 19)) == 19.0


def test_mencoder_incomplete_line_waits() -> None:
    """A status line counts only once its carriage return arrives, even across feeds."""
    p = MencoderProgress(duration=10.0)
    line = _pos(5.0, 125, 50)
    assert p.feed(line[:9]) is None
    assert p.feed(line[9:-1]) is None
    assert p.feed(line[-1:]) == 50.0


def test_mencoder_newest_of_several() -> None:
    """Several lines in one chunk give the newest percentage."""
    p = MencoderProgress(duration=10.0)
    assert p.feed(_pos(1.0, 25, 20) + _pos(2.0, 50, 21) + _pos(3.0, 75, 22)) == 30.0
    assert p.latest == 30.0


def test_mencoder_other_lines_ignored() -> None:
    """Lines that are not status lines give nothing."""
    p = MencoderProgress(duration=10.0)
    assert p.feed(b"Writing header...\nPos: garbage\r\n") is None


def test_mencoder_clamped() -> None:
    """A position past the duration, or a (NN%) past 100, gives 100 and not more."""
    assert MencoderProgress(duration=10.0).feed(_pos(12.5, 300, 80)) == 100.0
    assert MencoderProgress(duration=None).feed(_pos(12.5, 300, 130)) == 100.0


def test_mencoder_overlong_line_dropped_whole() -> None:
    """A line longer than MAX_LINE is dropped, and parsing resumes after its end."""
    p = MencoderProgress(duration=10.0)
    assert p.feed(b"x" * (MAX_LINE + 10) + _pos(1.0, 25, 10)) is None
    assert p.feed(_pos(2.0, 50, 10)) == 20.0


def test_ffmpeg_blocks() -> None:
    """Each block ending in progress=continue gives out_time_us over the duration."""
    p = FfmpegProgress(duration=6.0)
    assert p.feed(_block("N/A")) is None
    assert p.feed(_block("1500000")) == 25.0
    assert p.feed(_block("3000000")) == 50.0


def test_ffmpeg_negative_time_clamped() -> None:
    """The negative times of audio priming give 0."""
    assert FfmpegProgress(duration=6.0).feed(_block("-23220")) == 0.0


def test_ffmpeg_end_is_100() -> None:
    """progress=end gives 100 whatever the duration."""
    assert FfmpegProgress(duration=6.0).feed(_block("1000000", "end")) == 100.0
    assert FfmpegProgress(duration=None).feed(_block("N/A", "end")) == 100.0


def test_ffmpeg_without_duration() -> None:
    """Without a duration a continuing block gives no percentage."""
    assert FfmpegProgress(duration=None).feed(_block("1500000")) is None


def test_ffmpeg_duration_learnt_later() -> None:
    """A duration set after the start makes the next block a percentage."""
    p = FfmpegProgress(duration=None)
    assert p.feed(_block("1500000")) is None
    p.duration = 6.0
    assert p.duration == 6.0
    assert p.feed(_block("3000000")) == 50.0


def test_ffmpeg_out_time_fallback() -> None:
    """When only out_time (H:MM:SS.us) is usable, it is used."""
    p = FfmpegProgress(duration=100.0)
    assert p.feed(b"out_time_us=N/A\nout_time=00:00:25.000000\nprogress=continue\n") == 25.0


def test_ffmpeg_block_position_not_carried_over() -> None:
    """A block without a time does not reuse the previous block's."""
    p = FfmpegProgress(duration=10.0)
    assert p.feed(_block("5000000")) == 50.0
    assert p.feed(b"frame=3\nprogress=continue\n") is None


def test_ffmpeg_crlf() -> None:
    """Lines ended with CRLF parse like LF ones."""
    p = FfmpegProgress(duration=4.0)
    assert p.feed(b"out_time_us=1000000\r\nprogress=continue\r\n") == 25.0


@given(st.lists(st.integers(min_value=0, max_value=len(MENCODER_RUN)), max_size=40))
def test_mencoder_chunking_irrelevant(cuts: list[int]) -> None:
    """Any chunking of the same mencoder output gives the same percentages."""
    whole = MencoderProgress(duration=12.0)
    whole.feed(MENCODER_RUN)
    by_byte = _feed_all(
        MencoderProgress(duration=12.0), [MENCODER_RUN[i : i + 1] for i in range(len(MENCODER_RUN))]
    )
    chunked = MencoderProgress(duration=12.0)
    values = _feed_all(chunked, _chunked(MENCODER_RUN, cuts))
    assert chunked.latest == whole.latest
    assert values[-1] == whole.latest
    # Every value a chunking reports is one that byte-by-byte feeding reports too.
    assert set(values) <= set(by_byte)
    assert len(by_byte) == MENCODER_RUN.count(b"Pos:")


@given(st.lists(st.integers(min_value=0, max_value=len(FFMPEG_RUN)), max_size=40))
def test_ffmpeg_chunking_irrelevant(cuts: list[int]) -> None:
    """Any chunking of the same ffmpeg output gives the same percentages."""
    whole = FfmpegProgress(duration=6.0)
    whole.feed(FFMPEG_RUN)
    chunked = FfmpegProgress(duration=6.0)
    values = _feed_all(chunked, _chunked(FFMPEG_RUN, cuts))
    by_byte = _feed_all(
        FfmpegProgress(duration=6.0), [FFMPEG_RUN[i : i + 1] for i in range(len(FFMPEG_RUN))]
    )
    assert by_byte == [0.0, 25.0, 50.0, 100.0]
    assert chunked.latest == whole.latest == 100.0
    assert set(values) <= set(by_byte)


@given(
    st.lists(st.binary(max_size=300), max_size=20),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_mencoder_arbitrary_bytes(chunks: list[bytes], duration: float | None) -> None:
    """Arbitrary bytes never raise and never give a value outside 0..100."""
    p = MencoderProgress(duration)
    for value in _feed_all(p, chunks):
        assert 0.0 <= value <= 100.0


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from(
                [b"out_time_us=", b"out_time=", b"progress=continue\n", b"\n", b"-", b"99999999"]
            ),
        ),
        max_size=30,
    ),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_ffmpeg_arbitrary_bytes(chunks: list[bytes], duration: float | None) -> None:
    """Arbitrary bytes, keys included, never raise and never give a value outside 0..100."""
    p = FfmpegProgress(duration)
    for value in _feed_all(p, chunks):
        assert 0.0 <= value <= 100.0


@given(st.lists(st.binary(max_size=200), max_size=10), st.lists(st.integers(0, 4000), max_size=10))
def test_mencoder_arbitrary_stream_chunking(parts: list[bytes], cuts: list[int]) -> None:
    """For any byte stream, the chunking does not change the newest percentage."""
    data = b"".join(parts) + _pos(1.0, 25, 10) + b"".join(reversed(parts))
    whole = MencoderProgress(duration=5.0)
    whole.feed(data)
    chunked = MencoderProgress(duration=5.0)
    _feed_all(chunked, _chunked(data, cuts))
    assert chunked.latest == whole.latest

"""Downloads that survive a flaky network: streamed with a progress bar, retried with exponential backoff, resumed
with an HTTP Range request after a cut, and renamed into place only when whole and checked. No jax: data.py fetches
tiny Shakespeare with it, weights.py OpenAI's release.

    download(url, path)                       # path appears only once the whole file has arrived
    download(url, path, check=my_check)       # ... and my_check(part) accepted it (raise ValueError to refuse)
"""
import os
import re
import time
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

import files

RETRIES = 3        # further attempts after a connection error, a cut transfer or a 5xx answer
BACKOFF_S = 0.5    # wait before retry k (k = 0, 1, ...): BACKOFF_S * 2**k seconds
TIMEOUT_S = 30     # connect and read timeout of each request
CHUNK = 1 << 16    # bytes per write; small enough that a cut transfer keeps most of what arrived
STALL_WINDOW_S = 60  # a transfer slower than MIN_RATE bytes/s over this long is cut (and resumed by a retry)
MIN_RATE = 1024


class TooLarge(ValueError):
    """What the server sends is larger than the file can be."""


def download(url: str, path: Path, check=None, max_bytes: int | None = None) -> Path:
    """Fetch url into path, streamed with a progress bar. Connection errors, stalls, cut transfers and 5xx answers are
    retried with exponential backoff; a cut transfer resumes where it stopped (HTTP Range, the answer's Content-Range
    checked). The data grows in `path.part` and is renamed to path only when its size matches Content-Length and
    check(part) (if given) accepts it, so path never holds a partial file, nor a web page that a proxy or captive
    portal sent in its place. max_bytes: the most the file can be; a server sending more is stopped there."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        try:
            size, expected = fetch_into(url, part, path.name, max_bytes)
        except TooLarge as e:
            part.unlink(missing_ok=True)
            raise ConnectionError(f"what {url} sent is not the file expected ({e})") from None
        except requests.HTTPError as e:
            status = e.response.status_code
            if status == 404:
                raise FileNotFoundError(f"{url} does not exist (HTTP 404)") from None
            if status < 500:
                raise ConnectionError(f"downloading {url} failed: HTTP {status} {e.response.reason}") from None
            problem = f"HTTP {status}"
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.HTTPError) as e:  # the last: what the raw socket reads below raise on a cut
            problem = short_reason(e)
        else:
            if expected is None or size == expected:
                try:
                    if check is not None:
                        check(part)
                except (ValueError, IndexError, KeyError) as e:
                    part.unlink(missing_ok=True)
                    raise ConnectionError(f"what {url} sent is not the file expected ({e}); was it a proxy's or a "
                                          f"captive portal's page?") from None
                os.replace(part, path)
                return path
            problem = f"transfer cut at {size} of {expected} bytes"
    raise ConnectionError(f"could not download {url}: {problem} ({RETRIES + 1} attempts)")


def fetch_into(url, part, desc, max_bytes=None):  # -> (bytes now in part, whole size or None if not said)
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # sizes must be the file's, not a compressed stream's
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as r:
        if r.status_code == 416 and have:  # part is not a prefix of the file (it is as long or longer): start over
            part.unlink()
            return fetch_into(url, part, desc, max_bytes)
        r.raise_for_status()
        if r.headers.get("Content-Type", "").startswith("text/html"):  # no release file is a web page
            raise requests.ConnectionError(f"the server answered with a web page (Content-Type "
                                           f"{r.headers['Content-Type']}), not the file")
        if r.status_code == 206:  # the rest of the file, which must start where part ends
            sent = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", "").strip())
            if sent is None or int(sent.group(1)) != have:
                part.unlink()  # what we hold cannot be joined to what came: start over on the next attempt
                raise requests.ConnectionError(f"the server sent the range {r.headers.get('Content-Range')!r} "
                                               f"when asked for bytes {have}-")
        else:  # a 200 is the whole file: the server ignored the Range request
            have = 0
        length = r.headers.get("Content-Length")
        expected = have + int(length) if length is not None and length.isdigit() else None
        if max_bytes is not None and expected is not None and expected > max_bytes:
            raise TooLarge(f"{expected:,} bytes, more than the {max_bytes:,} it can be")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if have else os.O_TRUNC)
        bar = tqdm(total=expected, initial=have, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
        with os.fdopen(files.open_fd(part, flags), "ab" if have else "wb") as f, bar:
            window = [(time.monotonic(), 0)]  # (time, bytes so far) at the start of the current rate window
            try:
                # read1: what one read of the socket brings, so that a trickle is seen as it trickles (iter_content
                # would wait for a whole chunk, which a byte every few seconds never fills in any time)
                while chunk := r.raw.read1(CHUNK):
                    if max_bytes is not None and f.tell() + len(chunk) > max_bytes:
                        raise TooLarge(f"more than the {max_bytes:,} bytes it can be")
                    f.write(chunk)
                    bar.update(len(chunk))
                    check_rate(window, len(chunk))
            finally:  # keep what arrived, for the next attempt to resume from
                f.flush()
                os.fsync(f.fileno())
    return part.stat().st_size, expected


def check_rate(window, n):
    """A transfer that trickles (a byte every few seconds keeps the read timeout from ever firing) is cut once a whole
    STALL_WINDOW_S brings fewer than MIN_RATE bytes a second; the next attempt resumes it."""
    start, count = window[-1]
    count += n
    now = time.monotonic()
    if now - start >= STALL_WINDOW_S:
        if count < MIN_RATE * (now - start):
            raise requests.ConnectionError(f"stalled: {count} bytes in {now - start:.0f} s")
        start, count = now, 0
    window[-1] = (start, count)


def short_reason(error):  # requests' messages run to several nested reprs; keep the OS's words when there are any
    found = re.search(r"\[Errno -?\d+\][^'\")]*", str(error))
    if found:
        return found.group(0).strip()
    return str(error) if 0 < len(str(error)) < 200 else type(error).__name__

"""Helpers shared by the tests: the one module test files import from (never each other).

1. *Data*: :data:`TEXT`, the small code corpus of the tiny models' tokenizer, and
   :func:`text_tokens`, it cut into BOS-prefixed rows.
2. *Dictionaries*: :func:`random_pair`, a pair with random (but seeded and non-degenerate)
   encoders, and :func:`random_resid`, residual rows of random tokens at a layer.
3. *Reference edges*: :func:`autograd_edges`, the resid→MLP edges by one backward per active
   MLP feature per token, the plain reference the closed forms are checked against.
4. *Browser*: :func:`browser`, :func:`click_node`, :func:`screenshot_report`, a headless
   Chromium through selenium for the report's browser test and the screenshots in ``docs/``
   (needs selenium and Debian's ``chromium chromium-driver``).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from featcircuit import harvest
from featcircuit.dictionary import DictConfig, Dictionary, Pair
from featcircuit.errors import UserError
from featcircuit.sites import pair_sites

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n"
        "        self.x = x\n        self.y = y\n") * 20


# ---- 1. data ---------------------------------------------------------------------------------


def text_tokens(model, n_ctx: int = 32) -> torch.Tensor:
    """:data:`TEXT` tokenized and cut into rows of ``n_ctx`` tokens, each starting with BOS."""
    ids = model.tokenizer(TEXT)["input_ids"]
    body = n_ctx - 1
    n = len(ids) // body
    t = torch.tensor(ids[: n * body]).view(n, body)
    return torch.cat([torch.full((n, 1), model.tokenizer.bos_token_id), t], 1)


# ---- 2. dictionaries -------------------------------------------------------------------------


def random_pair(model, layer, arch="topk", k=6, width=3, seed=0, dtype=torch.float32) -> Pair:
    """A (resid, mlp) pair of ``width``·d_model features with random seeded encoders and biases."""
    r, m = pair_sites(model, layer)
    out = []
    for i, s in enumerate((r, m)):
        d = Dictionary(DictConfig(d_in=s.width, d_sae=width * r.width, architecture=arch, k=k),
                       seed=seed + i).to(dtype)
        g = torch.Generator().manual_seed(100 + seed + i)  # independent of the global RNG state
        with torch.no_grad():
            d.W_enc.copy_(torch.randn(d.W_enc.shape, generator=g) / s.width**0.5)
            d.b_enc.copy_(torch.randn(d.b_enc.shape, generator=g) * 0.1)
            d.b_dec.copy_(torch.randn(d.b_dec.shape, generator=g) * 0.1)
        out.append(d.eval())
    return Pair(*out)


def random_resid(model, layer, n=2, ctx=7, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [n, ctx], resid rows [n·(ctx-1), d_model])`` of random tokens, position 0 dropped."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.d_vocab, (n, ctx), generator=g)
    hook = pair_sites(model, layer)[0].hook
    return tokens, harvest(model, tokens, [hook], progress=False)[hook][:, 1:].reshape(-1, model.cfg.d_model)


# ---- 3. reference edges ----------------------------------------------------------------------


def _ln_frozen(parts, x):
    xc = x - x.mean(-1, keepdim=True)
    inv = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + parts.ln_eps).detach()
    return xc * inv * parts.ln_weight + parts.ln_bias


def autograd_edges(parts, R, M, x, frozen=False) -> torch.Tensor:
    """Reference: one backward per active target per token; dense [T, d_M, d_R + 1]."""
    T, d_r, d_m = len(x), R.W_dec.shape[0], M.W_dec.shape[0]
    out = torch.zeros(T, d_m, d_r + 1, dtype=torch.float64)
    for t in range(T):
        xt = x[t:t + 1].clone().requires_grad_(True)
        u = _ln_frozen(parts, xt) if frozen else parts.ln(xt)
        f = M.encode(parts.act(u @ parts.W_in + parts.b_in))[0]
        a = R.encode(x[t:t + 1])[0].detach()
        err = (x[t] - R.decode(a[None])[0]).detach()
        for j in torch.nonzero(f).flatten().tolist():
            (g,) = torch.autograd.grad(f[j], xt, retain_graph=True)
            g = g[0]
            for i in torch.nonzero(a).flatten().tolist():
                out[t, j, i] = float(a[i] * (g @ R.W_dec[i]).detach())
            out[t, j, d_r] = float(g @ err)
    return out


# ---- 4. browser ------------------------------------------------------------------------------


@contextmanager
def browser(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium selenium driver (browser log enabled); needs selenium, chromium, chromedriver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise UserError("selenium is not installed: pip install selenium") from None
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        raise UserError(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver")
    with tempfile.TemporaryDirectory(prefix="featcircuit-chromium-") as profile:
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            opts.add_argument(a)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        try:
            driver.set_window_size(width, height)
            yield driver
        finally:
            driver.quit()


def click_node(driver, node: str) -> None:
    """Click the SVG node ``node`` of an open report (falls back to its node-table row without an SVG)."""
    from selenium.webdriver.common.by import By

    for g in driver.find_elements(By.CSS_SELECTOR, "#graph g.node"):
        t = g.find_element(By.TAG_NAME, "title")
        if t.get_attribute("textContent").strip() == node:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", g)
            target = (g.find_elements(By.CSS_SELECTOR, "text")
                      or g.find_elements(By.CSS_SELECTOR, "path, polygon"))
            (target or [g])[0].click()  # a real click where a user would: on the node's label
            return
    for row in driver.find_elements(By.CSS_SELECTOR, "tr[data-open]"):
        if row.get_attribute("data-open") == node:
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", row)
            row.click()
            return
    raise UserError(f"node {node!r} is not in the report")


def screenshot_report(html_path: str | Path, png: str | Path, *, node: str | None = None,
                      width: int = 1600, height: int = 1000) -> list[dict]:
    """Open a report in headless Chromium, optionally click ``node``, save a PNG; returns the browser log."""
    with browser(width, height) as driver:
        driver.get(Path(html_path).resolve().as_uri())
        if node is not None:
            from selenium.webdriver.common.action_chains import ActionChains
            from selenium.webdriver.common.by import By

            click_node(driver, node)
            driver.execute_script("window.scrollTo(0, 0);")
            # park the pointer on the header, so no node is drawn in its hover state
            ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "header")).perform()
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(png))
        return driver.get_log("browser")


class Foreign(torch.nn.Module):
    """A user's dictionary: only encode/decode, none of featcircuit's weight names."""

    def __init__(self, d):
        super().__init__()
        self.inner = d

    def encode(self, x):
        return self.inner.encode(x)

    def decode(self, c):
        return self.inner.decode(c)


def created_names(folder: str | Path, fn) -> set[str]:
    """Every name created or moved into ``folder`` while ``fn()`` runs, by any code (Python or a
    native library's own file calls), from the kernel's inotify events; the test is skipped where
    inotify is not available (not Linux, no instance left, a sandbox that forbids it)."""
    import ctypes
    import errno
    import os
    import struct
    import sys

    import pytest

    if sys.platform != "linux":
        pytest.skip("inotify is Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    IN_CREATE, IN_MOVED_TO, IN_Q_OVERFLOW, IN_NONBLOCK = 0x100, 0x80, 0x4000, 0o4000
    fd = libc.inotify_init1(IN_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EMFILE, errno.ENFILE, errno.ENOSYS, errno.EPERM, errno.ENOMEM):
            pytest.skip(f"inotify unavailable here: {os.strerror(err)}")
        raise OSError(err, "inotify_init1")
    try:
        if libc.inotify_add_watch(fd, str(folder).encode(), IN_CREATE | IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        fn()
        names: set[str] = set()
        while True:
            try:
                buf = os.read(fd, 1 << 16)
            except BlockingIOError:
                return names
            at = 0
            while at < len(buf):  # struct inotify_event: wd, mask, cookie, len, name[len]
                _, mask, _, n = struct.unpack_from("iIII", buf, at)
                if mask & IN_Q_OVERFLOW:
                    raise RuntimeError("inotify queue overflowed: events were lost")
                name = buf[at + 16:at + 16 + n].split(b"\0", 1)[0].decode()
                if name:
                    names.add(name)
                at += 16 + n
    finally:
        os.close(fd)

"""Held tensors (params `_held`): conditioning sent once and referred to afterwards, through real unet
services on 127.0.0.1 — bytes on the wire, bitwise equal outputs, a restarted service, ids per client,
budgets, bad params; and the store's budgets and idle drop on its own."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
import torch

from luna_stack.client.held import HeldInputs
from luna_stack.client.http import AsyncClient
from luna_stack.devtools.embedded import EmbeddedService, free_port
from luna_stack.server.held import MIN_ENTRY_BYTES, HeldSpec, HeldTensors
from luna_stack.server.routes import HELD
from luna_stack.unet.family import build
from luna_stack.wire.errors import BadRequest, UnknownReference

from .conftest import make_settings

SDXL = "unet/sdxl-small-unet.safetensors"
KEEP = ("context", "y")


def sdxl_inputs(seed: int, rows: int = 2) -> dict[str, torch.Tensor]:
    """An SDXL-small step (context 96 wide, y 1600) of a fixed conditioning and a per-seed latent."""
    cond = torch.Generator().manual_seed(1000)
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(rows, 4, 8, 8, generator=gen),
        "timesteps": torch.rand(rows, generator=gen) * 999,
        "context": torch.randn(rows, 77, 96, generator=cond),
        "y": torch.randn(rows, 1600, generator=cond),
    }


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture
def unet(models_dir: Path, start_service) -> EmbeddedService:
    return start_service(build, make_settings(models_dir))


async def _step(client: AsyncClient, inputs: dict, keep=KEEP) -> tuple[torch.Tensor, int]:
    """(out, request body bytes) of one step."""
    before = client.bytes_sent
    out, _ = await client.call("step", inputs, {"model": SDXL}, keep=keep)
    return out["out"], client.bytes_sent - before


async def test_conditioning_travels_once_and_outputs_equal_full_sends(unet: EmbeddedService) -> None:
    async with (
        AsyncClient("unet", url=unet.url, name="held") as held,
        AsyncClient("unet", url=unet.url, name="full") as full,
    ):
        sizes = []
        for seed in range(4):
            inputs = sdxl_inputs(seed)
            out, size = await _step(held, inputs)
            expected, full_size = await _step(full, inputs, keep=())
            assert torch.equal(out, expected)
            sizes.append((size, full_size))
        status = await held.status()
    conditioning = nbytes(sdxl_inputs(0)["context"], sdxl_inputs(0)["y"])
    first, later = sizes[0], sizes[1:]
    assert first[0] > first[1] - 1000  # the first step carries everything
    for size, full_size in later:
        assert size < full_size - conditioning + 1000  # later ones: no context, no y (params only)
    assert held.held.counts.referred == 6 and held.held.counts.sent == 2
    assert status["held"]["hits"] == 6 and status["held"]["entries"] == 2
    assert status["held"]["misses"] == 0 and status["held"]["clients"] == 1
    assert status["held"]["bytes"] == conditioning


async def test_changed_conditioning_is_sent_again_and_alternation_stays_referenced(
    unet: EmbeddedService,
) -> None:
    """ComfyUI may run cond and uncond as two calls a step: both stay referenced (DEPTH per name)."""
    other = {k: v.flip(0) if k in KEEP else v for k, v in sdxl_inputs(0).items()}
    async with AsyncClient("unet", url=unet.url) as client, AsyncClient("unet", url=unet.url) as full:
        for step in range(3):
            for inputs in (sdxl_inputs(step), {**other, "x": sdxl_inputs(step)["x"]}):
                out, _ = await _step(client, inputs)
                assert torch.equal(out, (await _step(full, inputs, keep=()))[0])
        assert client.held.counts.sent == 4 and client.held.counts.referred == 8


async def test_a_restarted_service_gets_the_tensors_again(models_dir: Path) -> None:
    port = free_port()
    settings = make_settings(models_dir)
    first = EmbeddedService(build(settings), port=port).start().wait_ready()
    second = None
    try:
        async with AsyncClient("unet", url=first.url) as client:
            before, _ = await _step(client, sdxl_inputs(0))
            first.stop()
            second = EmbeddedService(build(settings), port=port).start().wait_ready()
            await asyncio.sleep(0.2)  # let this loop see the old server close its keep-alive connection
            out, size = await _step(client, sdxl_inputs(0))  # a reference, 409, then in full
            assert torch.equal(out, before) and client.held.counts.resent == 1
            out, size = await _step(client, sdxl_inputs(1))
            assert size < nbytes(*sdxl_inputs(1).values()) - nbytes(sdxl_inputs(1)["context"])
            status = await client.status()
        assert status["held"]["misses"] == 2 and status["held"]["hits"] == 2
    finally:
        with contextlib.suppress(Exception):
            first.stop()
        if second is not None:
            second.stop()


async def test_an_evicted_entry_is_resent_and_ids_belong_to_their_client(
    models_dir: Path, start_service
) -> None:
    # Room for one context (59 KiB) and one y (12.5 KiB) per client: a second context evicts the first.
    svc = start_service(build, make_settings(models_dir, LUNA_HELD_MB_PER_CLIENT="0.09"))
    a, b = sdxl_inputs(0), {**sdxl_inputs(1), "context": sdxl_inputs(0)["context"] * 2}
    async with AsyncClient("unet", url=svc.url, name="one") as client:
        for inputs in (a, b, a):
            out, _ = await _step(client, inputs)
            assert torch.equal(out, (await _step(client, inputs, keep=()))[0])
        assert client.held.counts.resent == 1  # `a`'s context was evicted by `b`'s
        # The protocol by hand: client "one" keeps under an id it chose, "two" cannot use it.
        params = {"model": SDXL, "_held": {"keep": {"context": "ctx-1"}}}
        out, reply = await client.call("step", a, params)
        assert reply["_held"] == {"kept": ["context"]}
        rest = {k: v for k, v in a.items() if k != "context"}
        used = {"model": SDXL, "_held": {"use": {"context": "ctx-1"}}}
        again, _ = await client.call("step", rest, used)
        assert torch.equal(again["out"], out["out"])
    async with AsyncClient("unet", url=svc.url, name="two") as intruder:
        with pytest.raises(UnknownReference, match="no tensor for"):
            await intruder.call("step", rest, used)


async def test_over_the_budget_is_not_kept_and_still_correct(models_dir: Path, start_service) -> None:
    svc = start_service(build, make_settings(models_dir, LUNA_HELD_MB_PER_CLIENT="0.02"))  # y only
    async with AsyncClient("unet", url=svc.url) as client:
        for seed in range(3):
            inputs = sdxl_inputs(seed)
            out, size = await _step(client, inputs)
            assert torch.equal(out, (await _step(client, inputs, keep=()))[0])
            assert size > nbytes(inputs["context"])  # the context travels every time
        status = await client.status()
    assert status["held"]["refused"] == 3 and status["held"]["entries"] == 1  # y alone fits
    assert client.held.counts.referred == 2


async def test_bad_held_params_are_400_and_the_service_stays_up(unet: EmbeddedService) -> None:
    inputs = sdxl_inputs(0)
    rest = {k: v for k, v in inputs.items() if k != "context"}
    cases = [
        (inputs, "context", "must be"),
        (inputs, {"keep": {}, "drop": {}}, "must be"),
        (inputs, {"keep": ["context"]}, "must be"),
        (inputs, {"keep": {"context": 5}}, "an id is a string"),
        (inputs, {"keep": {"context": "x" * 65}}, "an id is a string"),
        (inputs, {"keep": {"context": "a", "y": "a"}}, "an id of its own"),
        (inputs, {"keep": {"context": "a"}, "use": {"context": "b"}}, "both kept and used"),
        (rest, {"keep": {"context": "a"}}, "the request lacks"),
        (inputs, {"use": {"context": "a"}}, "sent and also referred to"),
    ]
    async with AsyncClient("unet", url=unet.url) as client:
        for tensors, held, message in cases:
            with pytest.raises(BadRequest, match=message) as err:
                await client.call("step", tensors, {"model": SDXL, "_held": held})
            assert err.value.status == 400
        with pytest.raises(BadRequest, match="queued jobs cannot refer to held tensors"):
            await client.submit("step", inputs, {"model": SDXL, "_held": {"keep": {"context": "a"}}})
        out, _ = await client.call("step", inputs, {"model": SDXL})
        assert out["out"].shape == inputs["x"].shape


# -- the store on its own --------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_store_budgets_lru_across_clients_and_idle_drop() -> None:
    clock = Clock()
    kib = torch.zeros(256)  # 1 KiB, counted as MIN_ENTRY_BYTES
    store = HeldTensors(torch.device("cpu"), 3 * MIN_ENTRY_BYTES, 4 * MIN_ENTRY_BYTES, idle_s=10, clock=clock)

    def keep(client: str, **ids: str) -> list[str]:
        spec = HeldSpec.parse({"keep": ids})
        sent = {name: kib + i for i, name in enumerate(ids)}
        return store.keep(client, spec, store.resolve(client, spec, sent))

    def uses(client: str, ident: str) -> bool:
        try:
            store.resolve(client, HeldSpec.parse({"use": {"t": ident}}), {})
            return True
        except UnknownReference:
            return False

    assert keep("a", t1="a1", t2="a2", t3="a3", t4="a4") == ["t1", "t2", "t3"]  # never evicts its own
    assert store.stats.refused == 1
    assert uses("a", "a1")  # a1 is now the most recently used of a's
    assert keep("b", t="b1", u="b2") == ["t", "u"]  # the total (4) evicts the oldest of all: a2
    assert [uses("a", i) for i in ("a1", "a2", "a3")] == [True, False, True]
    assert not uses("b", "a1")  # ids are per client
    big = torch.zeros(4 * MIN_ENTRY_BYTES)
    spec = HeldSpec.parse({"keep": {"t": "huge"}})
    assert store.keep("b", spec, {"t": big}) == [] and store.describe()["entries"] == 4
    clock.now = 5.0
    assert uses("b", "b1")
    clock.now = 12.0  # a idle for 12 s, b for 7 s
    described = store.describe()
    assert described["clients"] == 1 and described["entries"] == 2
    assert described["bytes"] == 2 * MIN_ENTRY_BYTES and not uses("a", "a1")
    assert store.stats.evicted == 3 and store.stats.hits == 4 and store.stats.refused == 2


def test_kept_tensors_are_copies() -> None:
    store = HeldTensors(torch.device("cpu"), 1 << 20, 1 << 20, idle_s=10)
    sent = torch.ones(8)
    spec = HeldSpec.parse({"keep": {"t": "i"}})
    store.keep("a", spec, {"t": sent})
    sent.zero_()  # an IPC buffer reused by the client
    (got,) = store.resolve("a", HeldSpec.parse({"use": {"t": "i"}}), {}).values()
    assert torch.equal(got, torch.ones(8))


def test_a_reference_needs_the_same_bits_and_a_confirmed_keep() -> None:
    held = HeldInputs()
    zeros = torch.zeros(4)
    plan = held.plan({"c": zeros, "x": zeros}, ("c",))
    assert set(plan.tensors) == {"c", "x"} and set(plan.keep) == {"c"}
    assert not held.plan({"c": zeros}, ("c",)).use  # not confirmed yet: still sent
    held.confirm(plan, {"kept": ["c"]})
    assert held.plan({"c": zeros.clone()}, ("c",)).use == {"c": plan.keep["c"].id}
    assert not held.plan({"c": -zeros}, ("c",)).use  # torch.equal(-0.0, 0.0), but other bits
    assert not held.plan({"c": zeros.half()}, ("c",)).use and not held.plan({"c": zeros[None]}, ("c",)).use
    refused = held.plan({"c": torch.ones(4)}, ("c",))
    held.confirm(refused, {"kept": []})  # over the service's budget
    assert not held.plan({"c": torch.ones(4)}, ("c",)).use


async def test_a_quiet_clients_tensors_are_dropped_without_anyone_looking(
    models_dir: Path, start_service
) -> None:
    unet = start_service(build, make_settings(models_dir, LUNA_HELD_IDLE_S="1"))
    async with AsyncClient("unet", url=unet.url, name="leaves") as client:
        await _step(client, sdxl_inputs(0))
    store = unet.app[HELD]
    assert store.describe()["entries"] == 2
    await asyncio.sleep(2.0)  # idle 1 s, swept every 0.25 s: no request and no status call meanwhile
    assert store.stats.evicted == 2  # counted by the sweep before anything asks
    assert store.describe()["entries"] == 0

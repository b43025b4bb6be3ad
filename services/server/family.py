"""The model contract: what a service kind plugs into the server.

The server owns everything a request passes through — HTTP, auth, body limits, CUDA IPC, the job queue,
the batcher, the compute thread, status — and resolves the model a request names. A family owns what
depends on its models (the shape of Triton's python backend: initialize / execute(batch) / finalize):

- `load(name)` (compute thread): a resident model from a file under the model roots;
- `ops`: the operations it serves, each with the tensors it takes and returns (`OpSpec`; the server
  refuses unknown or missing tensors before the family sees a request);
- `serve(request)` (event loop): checks a request against its model and limits, hands the work it needs
  computed to `request.compute(work)` — the server batches it — and shapes the reply;
- `batch_key(work)`: work items with equal keys may run as one batch;
- `run_batch(works)` (compute thread): one forward for those items, each output delivered through its
  item's sink (`Sink.put`) before the next batch runs.

The three services differ only in their family (vae/family.py, unet/family.py, clip/family.py).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import torch

from luna_stack.config import Settings
from luna_stack.server.executor import GpuExecutor
from luna_stack.server.ipc import Sink
from luna_stack.server.metrics import Metrics
from luna_stack.server.progress import ProgressTable
from luna_stack.weights.paths import ModelRoots
from luna_stack.wire.errors import BadRequest

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from aiohttp import web

Tensors = dict[str, torch.Tensor]
Params = dict[str, Any]
M = TypeVar("M")  # a resident model
W = TypeVar("W", bound="Work")  # one request's share of a batch


@dataclass(frozen=True)
class TensorSpec:
    name: str  # a tensor name, or a prefix ending in '.' for a family of names (`control.`)
    doc: str
    optional: bool = False

    def matches(self, name: str) -> bool:
        return name.startswith(self.name) if self.name.endswith(".") else name == self.name


@dataclass(frozen=True)
class OpSpec:
    """An operation's inputs and outputs: the description clients read at GET /v1/<kind>/ops."""

    name: str
    doc: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()

    def check_names(self, tensors: Mapping[str, torch.Tensor]) -> None:
        unknown = sorted(n for n in tensors if not any(s.matches(n) for s in self.inputs))
        if unknown:
            names = ", ".join(s.name + ("*" if s.name.endswith(".") else "") for s in self.inputs)
            raise BadRequest(
                f"unexpected tensors {unknown} for {self.name}", hint=f"{self.name} takes {names or 'none'}"
            )

    def describe(self) -> dict[str, Any]:
        def spec(s: TensorSpec) -> dict[str, Any]:
            return {"name": s.name, "doc": s.doc, "optional": s.optional}

        return {
            "op": self.name,
            "doc": self.doc,
            "inputs": [spec(s) for s in self.inputs],
            "outputs": [spec(s) for s in self.outputs],
        }


class Work(Protocol):
    """What a family submits for batching: its rows count towards the batch size."""

    @property
    def rows(self) -> int: ...


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int
    max_delay_ms: float
    buckets: tuple[int, ...] | None = None  # CUDA graph batch sizes the batcher fits batches to


@dataclass(frozen=True)
class IdlePolicy:
    """What a service does while no request waits or runs (server/service.py)."""

    work_ms: float  # quiet time before each unit of `background_work`
    release_s: float  # quiet time after requests before cached device memory is released; 0: never


@dataclass
class ServiceContext:
    """What the server gives a family: the device, the roots, the compute thread, shared Redis."""

    kind: str
    settings: Settings
    device: torch.device
    dtype: torch.dtype
    roots: ModelRoots
    executor: GpuExecutor
    metrics: Metrics
    progress: ProgressTable
    replica_id: str
    redis: aioredis.Redis | None = None  # the process's one Redis client, set before startup()


@dataclass
class OpRequest(Generic[M]):
    """One request as a family sees it: its model already resolved, its tensors' names checked."""

    op: str
    model: M
    tensors: Tensors
    params: Params
    client: str
    sink: Sink
    compute: Callable[[Work], Awaitable[Any]] = field(repr=False)  # batch on the server's batcher
    # True once the client has gone (a long operation checks it between units of work)
    abandoned: Callable[[], bool] = field(repr=False, default=lambda: False)


@dataclass
class Reply:
    tensors: Tensors
    params: Params


class FamilySettings(Protocol):
    """The keys every family's settings section has (services/<kind>/settings.py)."""

    preload: list[str]
    load_on_demand: bool
    max_batch: int
    max_delay_ms: float


class ModelFamily(abc.ABC, Generic[M, W]):
    kind: ClassVar[str]
    folders: ClassVar[tuple[str, ...]]  # model folders under each root, searched in order
    takes_lora: ClassVar[bool] = False  # requests may name loras/ files (GET /v1/<kind>/models lists them)
    ops: ClassVar[Mapping[str, OpSpec]]
    section: ClassVar[type]  # its settings section (services/<kind>/settings.py: a FamilySettings)

    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.cfg: FamilySettings = ctx.settings.of(self.section)

    # -- configuration the server reads -------------------------------------------------------------
    @property
    def batching(self) -> BatchPolicy:
        return BatchPolicy(self.cfg.max_batch, self.cfg.max_delay_ms)

    @property
    def idle_policy(self) -> IdlePolicy | None:
        """None: the service does nothing while idle."""
        return None

    @property
    def preload(self) -> Sequence[str]:
        return self.cfg.preload

    @property
    def load_on_demand(self) -> bool:
        return self.cfg.load_on_demand

    # -- the contract --------------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self, name: str) -> M:
        """Load the model with this canonical (root-relative) name; runs on the compute thread."""

    @abc.abstractmethod
    async def serve(self, request: OpRequest[M]) -> Reply:
        """Check the request, compute what it needs through `request.compute`, and build its reply."""

    @abc.abstractmethod
    def batch_key(self, work: W) -> Hashable: ...

    @abc.abstractmethod
    def run_batch(self, works: Sequence[W]) -> list[Any]:
        """One forward for these work items (equal keys), results in their order; compute thread."""

    # -- optional hooks ------------------------------------------------------------------------------
    def describe_model(self, model: M) -> dict[str, Any]:
        return model.describe()  # type: ignore[attr-defined]

    async def startup(self) -> None:
        """Runs once before the preload list is loaded (ctx.redis is set by then, if configured)."""

    async def shutdown(self) -> None: ...

    def background_work(self, models: Sequence[M]) -> bool:
        """One unit of deferred work (a graph capture) on the compute thread, run while the service is
        idle (`idle_policy`); True while more remains."""
        return False

    def status(self, models: Sequence[M]) -> dict[str, Any]:
        """Family-specific status (caches, graphs), merged into GET /v1/status."""
        return {}

    def routes(self) -> list[web.RouteDef]:
        return []

"""pyproject.toml's ``torch>=X`` is true: every torch name the package and its benchmarks
reach exists in torch X, and so does every keyword they pass to a torch function.

The floor release's API is data (tests/data/torch_api_X.json), read from its wheel's
source by tests/tools/torch_api.py without installing it; that module's docstring has the
command that remakes it, and says what a static reading can and cannot see. The floor
comes from pyproject.toml itself, so the two cannot drift: raising it without the data
fails here. The planted files show that a name, a keyword or a private attribute torch X
lacks is caught, so a pass is not vacuous.
"""

import json
import re
import sys
import textwrap

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "tools"))
import torch_api


def floor() -> str:
    """The X of pyproject.toml's ``torch>=X``, as X.Y.Z."""
    deps = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(), re.MULTILINE | re.DOTALL).group(1)
    found = re.findall(r'"torch>=([0-9.]+)[",;]', deps)
    assert len(found) == 1, f"pyproject.toml's dependencies state no single torch>=X: {found}"
    parts = found[0].split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


@pytest.fixture(scope="module")
def floor_data() -> dict:
    path = torch_api.data_path(floor())
    assert path.exists(), (f"pyproject.toml says torch>={floor()} but {path.relative_to(REPO)} is missing: "
                           + torch_api.REGENERATE.format(v=floor()))
    return json.loads(path.read_text())


def test_the_data_is_the_floor_release(floor_data):
    assert floor_data["torch"] == floor()
    assert floor_data["source"].startswith(f"torch-{floor()}-")


def test_every_torch_name_and_keyword_the_package_uses_is_in_the_floor_release(floor_data):
    problems = torch_api.problems(floor_data, torch_api.references())
    assert not problems, f"torch {floor()} (pyproject.toml's floor) lacks:\n" + "\n".join(problems)


def test_the_scan_sees_the_package():
    """Not vacuous on the package itself: the hot paths' collectives and the classes it
    builds on are among the references."""
    names = {r.name for r in torch_api.references() if r.kind == "name"}
    assert {"torch.distributed.all_reduce", "torch.distributed.new_group",
            "torch.nn.parallel.DistributedDataParallel", "torch.futures.Future",
            "torch.distributed.distributed_c10d._get_default_group"} <= names
    keywords = {(r.name, r.detail) for r in torch_api.references() if r.kind == "keyword"}
    assert ("torch.distributed.new_group", "timeout") in keywords


def planted(tmp_path, source: str, floor_data: dict) -> list[str]:
    f = tmp_path / "planted.py"
    f.write_text(textwrap.dedent(source))
    return torch_api.problems(floor_data, torch_api.references(files=[f]))


def _only_planted(problems: list[str]) -> list[str]:
    return [p for p in problems if p.startswith("planted.py:")]


@pytest.mark.parametrize("source, expected", [
    # a collective newer than the floor, spelt three ways
    ("import torch.distributed as dist\ndist.reduce_scatter_single(a, b)\n",
     "has no torch.distributed.reduce_scatter_single"),
    ("from torch.distributed import all_gather_single\n", "has no torch.distributed.all_gather_single"),
    ("import torch\ndef f():\n    torch.distributed.all_gather_single(a, b)\n",
     "has no torch.distributed.all_gather_single"),
    # an attribute of a class, through the class
    ("import torch.distributed as dist\nx = dist.ReduceOp.NO_SUCH_OP\n", "has no attribute NO_SUCH_OP"),
    # a keyword the floor's function does not take
    ("import torch.distributed as dist\ndist.new_group([0], no_such_keyword=1)\n",
     "has no keyword no_such_keyword="),
    ("from torch.nn.parallel import DistributedDataParallel as DDP\nDDP(m, no_such_keyword=False)\n",
     "has no keyword no_such_keyword="),
    # private torch names: dotted, and on an object a static reading cannot type
    ("import torch\ntorch._no_such_private_op()\n", "has no torch._no_such_private_op"),
    ("import torch.distributed as dist\ndist.distributed_c10d._world\n", "is private to torch"),
    ("def f(ddp):\n    return ddp._no_such_private_method()\n", "looks like a private torch attribute"),
])
def test_a_planted_use_the_floor_lacks_is_caught(tmp_path, floor_data, source, expected):
    problems = _only_planted(planted(tmp_path, source, floor_data))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("source", [
    # what the floor has, spelt as the package spells it
    "import torch.distributed as dist\ndist.all_reduce(t, op=dist.ReduceOp.SUM, group=None)\n",
    "from torch.nn.parallel import DistributedDataParallel as DDP\nDDP(m, device_ids=None, bucket_cap_mb=25)\n",
    "import torch\nx = torch.zeros(3, dtype=torch.float64, device='cpu')\n",
    # not torch: a local name, an attribute of the package's own module, a stdlib private
    "def f(dist):\n    dist.reduce_scatter_single(a, b)\n",
    "from ddp_fnn.train import dist\ndist.no_such_name()\n",
    "import os\nos._exit(0)\n",
    # an optional newer API, behind a fallback
    ("import torch.distributed as dist\n"
     "rs = getattr(dist, 'reduce_scatter_single', None) or dist.reduce_scatter_tensor\n"),
])
def test_a_planted_use_the_floor_has_passes(tmp_path, floor_data, source):
    assert _only_planted(planted(tmp_path, source, floor_data)) == []


def test_the_static_reading_agrees_with_the_installed_torch(tmp_path):
    """The same reading of the torch this suite runs on (its site-packages, not a wheel)
    finds every name the package uses, and each of them resolves at run time too: the
    reader neither misses the names the package needs nor invents them."""
    import importlib

    import torch
    site = REPO.__class__(torch.__file__).parent.parent
    release = torch_api.Release(torch_api.Tree(site))
    refs = torch_api.references()
    data = torch_api.make_data(release, refs, f"torch-{torch.__version__}-installed")
    assert torch_api.problems(data, refs) == []
    for name in sorted({r.name for r in refs if r.kind in ("name", "module")}):
        parts = name.split(".")
        obj = importlib.import_module(parts[0])
        for i, p in enumerate(parts[1:], 1):      # raises if torch lacks it at run time
            try:
                obj = getattr(obj, p)
            except AttributeError:
                obj = importlib.import_module(".".join(parts[:i + 1]))


@pytest.fixture
def group_of_one():
    """A Gloo group of one in this (pytest's) process, left through ddp_fnn.dist.teardown
    (docs/shutdown.md, "Groups inside pytest")."""
    import torch.distributed as dist
    from conftest import gloo_threads_left

    from ddp_fnn import dist as ddist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    ddist.teardown()
    assert gloo_threads_left() == 0, "the group's Gloo threads outlived teardown()"


def test_the_hierarchical_all_reduce_uses_the_collectives_this_torch_names_current(group_of_one):
    """The in-node phases take torch 2.13's names where they exist (their predecessors warn
    there, once a call) and the floor's otherwise; on the installed torch they run, sum,
    and warn nothing."""
    import warnings

    import torch
    import torch.distributed as dist

    from ddp_fnn import dist as ddist
    from ddp_fnn.train import sync
    assert sync._reduce_scatter is getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
    assert sync._all_gather is getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
    h = ddist.NodeGroups(local_size=1, nodes=1, local=dist.new_group([0]), rail=None)
    buf = torch.arange(5, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sync._hierarchical_all_reduce(buf, h)
    assert torch.equal(buf, torch.arange(5, dtype=torch.float32))

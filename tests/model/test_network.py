"""The two-tower AlexNet: the paper's shapes and counts, equality with a grouped reference, LRN, DDP."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from alexnet_dist.errors import ConfigError
from alexnet_dist.kernels import lrn as lrn_kernel
from alexnet_dist.kernels import maxpool as maxpool_kernel
from alexnet_dist.model.config import PRESETS, AlexNetConfig
from alexnet_dist.model.network import (
    AlexNet,
    MaxPool2d,
    build_model,
    count_parameters,
    local_response_norm,
    relu_lrn,
)
from alexnet_dist.model.reference import GroupedAlexNet


def plain_lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Section 3.3 written out: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta.

    An even n reaches one channel further above than below (as Caffe does)."""
    channels = x.shape[1]
    below = (size - 1) // 2
    out = []
    for i in range(channels):
        lo, hi = max(0, i - below), min(channels - 1, i + size - 1 - below)
        s = (x[:, lo : hi + 1] ** 2).sum(dim=1)
        out.append(x[:, i] / (k + alpha * s) ** beta)
    return torch.stack(out, dim=1)


def test_paper_parameter_count_is_bvlc_alexnets() -> None:
    assert count_parameters(build_model("paper", num_classes=1000)) == 60_965_224


def test_tower_halves_have_the_papers_kernel_shapes() -> None:
    m = build_model("paper")
    ta = m.tower_a
    assert tuple(ta.conv1.weight.shape) == (48, 3, 11, 11)
    assert tuple(ta.conv2.weight.shape) == (128, 48, 5, 5)  # sees only its own tower's 48 maps
    assert tuple(ta.conv3.weight.shape) == (192, 256, 3, 3)  # sees both towers
    assert tuple(ta.conv4.weight.shape) == (192, 192, 3, 3)
    assert tuple(ta.conv5.weight.shape) == (128, 192, 3, 3)
    assert tuple(ta.fc6.weight.shape) == (2048, 9216)
    assert tuple(ta.fc7.weight.shape) == (2048, 4096)
    assert tuple(m.fc8.weight.shape) == (1000, 4096)


def test_map_sizes_are_55_27_13_6_at_227() -> None:
    m = build_model("paper").eval()
    seen: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(mod, inp, out) -> None:
            seen[name] = tuple(out.shape[1:])

        return hook

    hooks = [getattr(m.tower_a, n).register_forward_hook(record(n)) for n in ("conv1", "conv2", "conv5")]
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 227, 227)).shape == (1, 1000)
    for h in hooks:
        h.remove()
    assert seen["conv1"] == (48, 55, 55)
    assert seen["conv2"] == (128, 27, 27)
    assert seen["conv5"] == (128, 13, 13)
    assert m.tower_a.fc6.in_features == 256 * 6 * 6
    assert m.config.map_sizes() == (55, 27, 13, 6)


def test_initialisation_follows_section_5() -> None:
    torch.manual_seed(0)
    m = build_model("paper")
    for tower in (m.tower_a, m.tower_b):
        for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
            assert torch.all(getattr(tower, name).bias == 1.0), name
        for name in ("conv1", "conv3"):
            assert torch.all(getattr(tower, name).bias == 0.0), name
    assert torch.all(m.fc8.bias == 0.0)
    w = m.tower_a.fc6.weight
    assert abs(w.mean().item()) < 1e-4 and abs(w.std().item() - 0.01) < 1e-4


@pytest.mark.parametrize("span", ["tower", "all"])
def test_fast_lrn_matches_plain_formula_forward_and_backward(span: str) -> None:
    torch.manual_seed(1)
    x = (torch.randn(2, 13, 5, 4, dtype=torch.float64) * 20).requires_grad_()  # big enough for k to matter
    args = (5, 1e-4, 0.75, 2.0)
    y = local_response_norm(x, *args)
    ref = plain_lrn(x, *args)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gref, rtol=1e-10, atol=1e-12)
    for size in (3, 4):  # odd and even windows
        assert torch.autograd.gradcheck(
            lambda t, n=size: local_response_norm(t, n, 1e-2, 0.75, 1.0), (x[:1, :6, :2, :2],)
        )


@pytest.mark.skipif(not lrn_kernel.available(), reason="no C compiler: the model uses the torch formulation")
@pytest.mark.parametrize(
    ("shape", "size", "beta", "relu"),
    [
        ((3, 48, 55, 55), 5, 0.75, True),  # conv1's maps: 3025 pixels, not a multiple of the 256 block
        ((2, 128, 27, 27), 5, 0.75, False),
        ((2, 7, 3, 5), 3, 0.6, True),  # fewer channels than a window spans twice; powf path
        ((1, 9, 4, 4), 4, 0.75, True),  # even window: one more neighbour above than below
    ],
)
def test_fused_cpu_kernel_matches_relu_then_lrn(shape, size: int, beta: float, relu: bool) -> None:
    torch.manual_seed(4)
    x64 = (torch.randn(*shape, dtype=torch.float64) * 20).requires_grad_()
    g = torch.randn(*shape, dtype=torch.float64)
    args = (size, 1e-3, beta, 2.0)
    ref = plain_lrn(torch.relu(x64) if relu else x64, *args)  # autograd through the written-out formula
    (gref,) = torch.autograd.grad(ref, x64, g)
    x = x64.detach().float().requires_grad_()
    assert lrn_kernel.supports(x)
    y = lrn_kernel.relu_lrn(x, *args, relu=relu)
    (gx,) = torch.autograd.grad(y, x, g.float())
    # float32 against float64: agree to a few ulps of each tensor's scale; dead ReLU units get exactly 0
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(gx.double(), gref, rtol=1e-5, atol=1e-6 * gref.abs().max().item())
    if relu:
        assert torch.all(gx[x <= 0] == 0) and torch.all(y[x <= 0] == 0)
    threads = torch.get_num_threads()
    try:  # the split over threads changes no number
        torch.set_num_threads(1)
        y1 = lrn_kernel.relu_lrn(x, *args, relu=relu)
        (g1,) = torch.autograd.grad(y1, x, g.float())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y) and torch.equal(g1, gx)


def test_relu_lrn_takes_the_torch_path_for_what_the_kernel_does_not_take() -> None:
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64) * 20
    assert not lrn_kernel.supports(x)
    assert not lrn_kernel.supports(x.float().to(memory_format=torch.channels_last).transpose(2, 3))
    torch.testing.assert_close(relu_lrn(x, 5, 1e-3, 0.75, 2.0), plain_lrn(torch.relu(x), 5, 1e-3, 0.75, 2.0))


@pytest.mark.skipif(not maxpool_kernel.available(), reason="no C compiler: the model uses torch's max-pool")
@pytest.mark.parametrize(
    ("shape", "kernel", "stride"),
    [
        ((4, 48, 55, 55), 3, 2),  # pool1 of the paper: 27x27 outputs, planes folded one at a time
        ((64, 16, 16, 16), 3, 2),  # pool1 of the small preset: many small planes folded together
        ((3, 5, 13, 13), 3, 2),  # pool5 of the paper: 6x6
        ((2, 3, 8, 11), 2, 2),  # not square; z = s
        ((2, 3, 9, 7), 3, 1),  # stride 1: windows overlap by two
        ((1, 2, 20, 20), 5, 3),
    ],
)
def test_max_pool_kernel_equals_torch_bit_for_bit(shape, kernel: int, stride: int) -> None:
    torch.manual_seed(5)
    # After ReLU half the inputs are zeros: ties must pick torch's element, or gradients land elsewhere
    x = torch.randn(*shape).clamp_(min=0)
    x[0, 0, 0, :3] = float("nan")  # NaN wins a window in torch; the last NaN scanned gets the gradient
    x[-1, -1, 1, 1] = float("nan")
    x[0, -1, 2:5, 2:5] = 0.5  # a window of equal values
    xt, xn = x.clone().requires_grad_(), x.clone().requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, kernel, stride)
    assert maxpool_kernel.supports(xn, kernel, stride)
    yn = maxpool_kernel.max_pool(xn, kernel, stride)
    g = torch.randn_like(yt)
    yt.backward(g)
    yn.backward(g)
    assert yn.shape == yt.shape
    assert torch.equal(yn.isnan(), yt.isnan()) and yt.isnan().any()
    assert torch.equal(yn.nan_to_num(-1.0), yt.nan_to_num(-1.0))
    assert torch.equal(xn.grad, xt.grad)  # every gradient to the same element, summed in the same order
    threads = torch.get_num_threads()
    try:  # the split over threads changes no number
        torch.set_num_threads(1)
        x1 = x.clone().requires_grad_()
        y1 = maxpool_kernel.max_pool(x1, kernel, stride)
        y1.backward(g)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1.nan_to_num(-1.0), yn.nan_to_num(-1.0)) and torch.equal(x1.grad, xn.grad)


def test_max_pool_module_takes_the_torch_path_for_what_the_kernel_does_not_take() -> None:
    pool = MaxPool2d(3, 2)
    big = torch.randn(8, 16, 16, 16)
    assert maxpool_kernel.supports(big, 3, 2) and big.numel() >= pool.NATIVE_MIN_ELEMENTS
    for x in (
        big.double(),  # float64
        big.to(memory_format=torch.channels_last),  # not NCHW-contiguous
        torch.randn(2, 4, 3, 3),  # tiny: torch's call costs less
    ):
        assert not (maxpool_kernel.supports(x, 3, 2) and x.numel() >= pool.NATIVE_MIN_ELEMENTS)
        assert torch.equal(pool(x), torch.nn.functional.max_pool2d(x, 3, 2))
    y = pool(big.requires_grad_())
    native = maxpool_kernel.available()
    assert type(y.grad_fn).__name__ == ("_MaxPoolBackward" if native else "MaxPool2DWithIndicesBackward0")
    assert torch.equal(y, torch.nn.functional.max_pool2d(big, 3, 2))


def test_lrn_matches_torch_with_alpha_scaled_by_n() -> None:
    # torch (like Caffe) divides alpha by n; the paper does not.
    x = torch.randn(4, 96, 9, 9) * 10
    ref = torch.nn.LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2.0)(x)
    torch.testing.assert_close(local_response_norm(x, 5, 1e-4, 0.75, 2.0), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["paper", "small"])
@pytest.mark.parametrize("span", ["tower", "all"])
def test_towers_equal_grouped_reference(preset: str, span: str) -> None:
    torch.manual_seed(2)
    cfg = AlexNetConfig(**{**PRESETS[preset].to_dict(), "lrn_span": span})
    towers = AlexNet(num_classes=10, config=cfg).eval()
    for p in towers.parameters():  # larger weights than N(0, 0.01), so every layer's output matters
        p.data.normal_(0, 0.05)
    # The same ReLU+LRN and max-pool functions in both (tested against the formula and torch above): with
    # two roundings of LRN, max-pooling's near-ties break differently and move single gradients by 1e-3.
    ref = GroupedAlexNet(10, cfg, cpu_kernels=True).copy_from(towers).eval()
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    out, out_ref = towers(x), ref(x)
    assert out.abs().max() > 1e-3
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    target = torch.tensor([1, 2, 3])
    torch.nn.functional.cross_entropy(out, target).backward()
    torch.nn.functional.cross_entropy(out_ref, target).backward()
    ref_grads = ref.tower_grads()
    for name, p in towers.named_parameters():
        # float32 sums in a different order: agree to 1e-5 of the gradient's own scale
        scale = ref_grads[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_state_dict_names_do_not_depend_on_placement(tmp_path) -> None:
    torch.manual_seed(3)
    a = build_model("small", num_classes=10, devices=("cpu", "cpu")).eval()
    path = tmp_path / "m.pt"
    torch.save(a.state_dict(), path)
    # The same model built straight onto the meta device (no storage): names must not change.
    meta = build_model("small", num_classes=10, devices=("meta", "meta"))
    assert list(meta.state_dict()) == list(a.state_dict())
    assert all(p.device.type == "meta" for p in meta.parameters())
    devices = ("cuda:0", "cuda:1") if torch.cuda.device_count() >= 2 else ("cpu", "cpu")
    b = build_model("small", num_classes=10, devices=devices).eval()
    b.load_state_dict(torch.load(path, weights_only=True))
    assert b.tower_a.conv1.weight.device.type == b.devices[0].type
    assert b.tower_b.conv1.weight.device == b.devices[1]
    x = torch.randn(2, 3, 32, 32)
    out = b(x)
    assert out.device == b.devices[0]
    torch.testing.assert_close(out.cpu(), a(x), rtol=1e-5, atol=1e-5)


def test_placement_sends_each_tower_to_its_device() -> None:
    m = build_model("small", num_classes=10, devices=("cpu", "meta"))
    assert {p.device.type for p in m.tower_a.parameters()} == {"cpu"}
    assert {p.device.type for p in m.tower_b.parameters()} == {"meta"}
    assert m.fc8.weight.device.type == "cpu"


def test_bad_configs_are_refused_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match="model.preset='huge'"):
        build_model("huge")
    with pytest.raises(ConfigError, match=r"channels\[0\]=95"):
        AlexNetConfig(channels=(95, 256, 384, 384, 256))
    with pytest.raises(ConfigError, match="image_size=20"):
        AlexNetConfig(image_size=20)
    with pytest.raises(ConfigError, match="num_classes=1"):
        AlexNet(num_classes=1)


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = build_model("small", num_classes=10)
    init = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ddp = DistributedDataParallel(model, device_ids=None, output_device=None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(2):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        queue.put(((gathered[0] - gathered[1]).abs().max().item(), (gathered[0] - init).abs().max().item()))
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's threads made ~1 exit in 7 abort ("terminate called without an
    # active exception", before this change too) after everything above had passed.
    os._exit(0)


def test_ddp_over_two_towers_keeps_replicas_identical() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, start_method="spawn", join=True)
    replica_gap, moved = queue.get()
    assert replica_gap == 0.0  # both ranks applied the same averaged gradients
    assert moved > 1e-4  # and the step really changed the weights

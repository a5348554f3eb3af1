"""lzn.hardware: the device settings change how the networks run, never what they compute
or how their checkpoints are keyed. Oracles: a plain build of the same objective from the
same seed, and PyTorch's own memory-format and compile definitions."""
import copy
import dataclasses

import pytest
import torch

from lzn.data.batches import make_batches
from lzn.hardware import COMPILED_GROUPS, HardwareConfig, apply_hardware
from lzn.objectives import GenerationObjective, LatentConfig
from lzn.roles import Role, field_roles
from lzn.task import DataConfig, ModelConfig, TaskConfig, build_objective
from lzn.trainer import OptimConfig, Trainer, TrainConfig
from tests.lzn.toy import ToyDecoder, ToyEncoder, toy_images

ALL_ON = HardwareConfig(tf32=True, channels_last=True, cudnn_benchmark=True, compile=True)


def _digits_objective():
    cfg = TaskConfig(name="gen_digits", objective="generation", data=DataConfig(name="digits"),
                     model=ModelConfig(encoder="digits_cnn", decoder="unet_digits"),
                     latent=LatentConfig(dim=16, steps=3))
    torch.manual_seed(0)
    return build_objective(cfg)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.rand(4, generator=g), torch.randn(4, 16, generator=g)


def _outputs(objective):
    x, t, cond = _inputs()
    with torch.no_grad():
        return objective.encoder(x), objective.decoder(x, t, cond)


class RecordingBackend:
    """A torch.compile backend that records each graph Dynamo hands it and runs it as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture
def cuda_switches():
    """apply_hardware sets process-wide switches: put them back for the next test."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) = saved


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # compiled code of one test (and its backend) must not serve the next
    yield
    torch._dynamo.reset()


def test_defaults_are_pytorchs_own_and_every_setting_is_runtime():
    assert HardwareConfig() == HardwareConfig(tf32=False, channels_last=False, cudnn_benchmark=False, compile=False)
    roles = field_roles(HardwareConfig)
    assert set(roles) == {f.name for f in dataclasses.fields(HardwareConfig)}
    assert set(roles.values()) == {Role.RUNTIME}  # a resumed run may switch any of them


def test_cuda_switches_stay_untouched_off_cuda(cuda_switches):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    apply_hardware(_digits_objective(), dataclasses.replace(ALL_ON, compile=False), "cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_on_cuda_tf32_and_cudnn_benchmark_are_switched_on(cuda_switches):
    """The switches are process-wide and need no tensor on the GPU: set them for a `cuda`
    device on any machine (the objective stays where it is)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    apply_hardware(_digits_objective(), HardwareConfig(), "cuda")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark  # off: defaults kept
    apply_hardware(_digits_objective(), HardwareConfig(tf32=True, cudnn_benchmark=True), "cuda")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark
    assert torch.get_float32_matmul_precision() == "high"  # readable by every torch API (no mixed-API state)


def test_channels_last_changes_the_layout_not_the_outputs_nor_the_checkpoint_keys():
    plain, nhwc = _digits_objective(), apply_hardware(_digits_objective(), HardwareConfig(channels_last=True), "cpu")
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in plain.parameters() if p.dim() == 4)
    for a, b in zip(_outputs(plain), _outputs(nhwc)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # same math, another summation order
    assert list(nhwc.state_dict()) == list(plain.state_dict())
    fresh = _digits_objective()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # so that loading has something to undo
    fresh.load_state_dict(nhwc.state_dict(), strict=True)
    for a, b in zip(_outputs(plain), _outputs(fresh)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compile_routes_encoder_and_decoder_through_the_compiler_and_keeps_their_outputs():
    backend = RecordingBackend()
    plain = _digits_objective()
    compiled = apply_hardware(_digits_objective(), HardwareConfig(compile=True), "cpu", compile_backend=backend)
    assert {n for n, _ in compiled.named_children()} == {n for n, _ in plain.named_children()}
    got, want = _outputs(compiled), _outputs(plain)
    assert len(backend.graphs) >= len(COMPILED_GROUPS)  # at least one graph per compiled network
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # the traced graph runs the same kernels


def test_a_compiled_objectives_checkpoint_loads_without_compile_and_back():
    backend = RecordingBackend()
    plain = _digits_objective()
    compiled = apply_hardware(_digits_objective(), HardwareConfig(compile=True), "cpu", compile_backend=backend)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no "_orig_mod." in any key
    with torch.no_grad():
        for p in compiled.parameters():
            p.mul_(0.5)  # weights of its own, so each load below is seen
    target = _digits_objective()
    target.load_state_dict(compiled.state_dict(), strict=True)
    for a, b in zip(_outputs(compiled), _outputs(target)):
        torch.testing.assert_close(b, a)
    compiled.load_state_dict(plain.state_dict(), strict=True)
    for a, b in zip(_outputs(plain), _outputs(compiled)):
        torch.testing.assert_close(b, a)


def test_a_deep_copy_of_a_compiled_network_runs_its_own_weights():
    """The trainer's EMA is a deep copy: it must compute with its own parameters, not call
    the compiled forward of the module it was copied from."""
    backend = RecordingBackend()
    compiled = apply_hardware(_digits_objective(), HardwareConfig(compile=True), "cpu", compile_backend=backend)
    ema = copy.deepcopy(compiled)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
    x, _, _ = _inputs()
    with torch.no_grad():
        zero_weights = ema.encoder(x)
        assert not torch.equal(zero_weights, compiled.encoder(x))
        torch.testing.assert_close(zero_weights, ema.encoder._call_impl(x), rtol=0, atol=0)


def _toy_trainer(run_dir, iterations, compile_backend=None):
    torch.manual_seed(0)
    objective = GenerationObjective(ToyEncoder(), ToyDecoder(), LatentConfig(dim=3, steps=4))
    if compile_backend is not None:
        objective = apply_hardware(objective, HardwareConfig(compile=True), "cpu", compile_backend=compile_backend)
    images, labels = toy_images()
    train = TrainConfig(iterations=iterations, batch_size=16, checkpoint_every=2, log_every=1, progress=False)
    batches = make_batches(images, labels, global_batch=16, seed=0, augment="none", two_view=False)
    optim = OptimConfig(lr={"encoder": 1e-2, "decoder": 1e-2}, warmup=3, ema_decay=0.99)
    return Trainer(objective, optim, train, batches, run_dir=run_dir)


def test_a_run_trained_compiled_resumes_uncompiled_as_if_never_compiled(tmp_path):
    backend = RecordingBackend()
    _toy_trainer(tmp_path / "mixed", 2, compile_backend=backend).fit()
    assert backend.graphs  # the first two steps ran through the compiler
    resumed = _toy_trainer(tmp_path / "mixed", 4)
    assert resumed.fit()["train/resumed_from_step"] == 2
    straight = _toy_trainer(tmp_path / "plain", 4)
    straight.fit()
    for a, b in zip([*straight.objective.parameters(), *straight.ema.parameters()],
                    [*resumed.objective.parameters(), *resumed.ema.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

"""Import of MTT/DATM replay_buffer_*.pt files into a TrajectoryStore (docs/formats.md)."""

import os

import pytest
import torch
from torch import nn

import lightning_distill
import lightning_distill.models as ld_models
from lightning_distill.models.params import ParamSpec
from lightning_distill.replay_buffers import import_replay_buffers
from lightning_distill.trajectories import TrajectoryStore, TrajectoryStoreError


def test_public_at_the_package_root():
    assert lightning_distill.import_replay_buffers is import_replay_buffers


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 3)


def write_buffers(d, num_files=2, experts=2, snapshots=4, seed=0):
    """DATM/MTT format: list of experts -> list of snapshots -> list of parameter tensors."""
    torch.manual_seed(seed)
    shapes = [p.shape for p in TinyConv().parameters()]
    files, originals = [], []
    for f in range(num_files):
        buf = []
        for _ in range(experts):
            expert = [[torch.randn(s) for s in shapes] for _ in range(snapshots)]
            buf.append(expert)
            originals.append(expert)
        path = d / f"replay_buffer_{f}.pt"
        torch.save(buf, path)
        files.append(path)
    return files, originals


def flat(snapshot):
    return torch.cat([t.reshape(-1) for t in snapshot])


def test_import_replay_buffers_equals_originals(tmp_path):
    files, originals = write_buffers(tmp_path)
    spec = ParamSpec.of(TinyConv())
    store = import_replay_buffers(
        files, tmp_path / "store", model={"name": "TinyConv"}, dataset="toy", spec=spec,
        hparams={"lr_teacher": 0.01},
    )
    assert store.expert_indices() == [0, 1, 2, 3]
    assert store.num_snapshots == 4 and store.num_params == spec.total == 2 * 9 + 2 + 24 + 3
    for i, expert in enumerate(originals):  # file order, then list order
        for s, snap in enumerate(expert):
            assert torch.equal(store.snapshot(i, s), flat(snap))
    assert store.hparams == {"lr_teacher": 0.01, "imported_from": [f.name for f in files]}
    assert store.spec == spec


def test_import_resumes_and_builds_spec_from_model(tmp_path, monkeypatch):
    files, originals = write_buffers(tmp_path)
    monkeypatch.setattr(ld_models, "build_model", lambda name, **kw: TinyConv(), raising=False)
    store = import_replay_buffers(tmp_path, tmp_path / "store", model={"name": "TinyConv"},
                                  dataset="toy")  # a directory expands to its buffers
    assert store.num_experts == 4
    os.remove(store.expert_path(2))
    written = []
    real = TrajectoryStore.write_expert
    monkeypatch.setattr(TrajectoryStore, "write_expert",
                        lambda self, i, t: written.append(i) or real(self, i, t))
    store = import_replay_buffers(files, tmp_path / "store", model={"name": "TinyConv"},
                                  dataset="toy")
    assert written == [2]  # the others were skipped
    assert torch.equal(store.load_expert(2), torch.stack([flat(s) for s in originals[2]]))


def test_import_directory_natural_order(tmp_path):
    shapes = [p.shape for p in TinyConv().parameters()]
    experts = {}
    for n in (10, 2):  # replay_buffer_2 must come before replay_buffer_10
        torch.manual_seed(n)
        experts[n] = [[torch.randn(s) for s in shapes] for _ in range(2)]
        torch.save([experts[n]], tmp_path / f"replay_buffer_{n}.pt")
    store = import_replay_buffers(tmp_path, tmp_path / "st", model={"name": "TinyConv"},
                                  dataset="toy", spec=ParamSpec.of(TinyConv()))
    assert torch.equal(store.snapshot(0, 1), flat(experts[2][1]))
    assert torch.equal(store.snapshot(1, 1), flat(experts[10][1]))


def test_import_shape_mismatch_names_file_expert_snapshot(tmp_path):
    files, originals = write_buffers(tmp_path)
    buf = torch.load(files[1], weights_only=True)
    buf[1][2][2] = torch.zeros(3, 7)  # fc.weight of file 1, expert 1, snapshot 2
    torch.save(buf, files[1])
    with pytest.raises(TrajectoryStoreError) as e:
        import_replay_buffers(files, tmp_path / "store", model={"name": "TinyConv"},
                              dataset="toy", spec=ParamSpec.of(TinyConv()))
    msg = str(e.value)
    assert "replay_buffer_1.pt: expert 1 (store index 3), snapshot 2" in msg
    assert "parameter #2 (fc.weight) has shape [3, 7], the model expects [3, 8]" in msg
    buf[1][2] = buf[1][2][:3]  # a missing tensor
    torch.save(buf, files[1])
    with pytest.raises(TrajectoryStoreError, match="snapshot 2: 3 parameter tensors, the model "
                       "has 4"):
        import_replay_buffers(files, tmp_path / "store", model={"name": "TinyConv"},
                              dataset="toy", spec=ParamSpec.of(TinyConv()))


def test_import_unequal_lengths_error_or_truncate(tmp_path):
    files, originals = write_buffers(tmp_path)
    buf = torch.load(files[0], weights_only=True)
    buf[1] = buf[1][:3]
    torch.save(buf, files[0])
    with pytest.raises(TrajectoryStoreError, match=r"different numbers of snapshots \(\[3, 4\]\)"
                       r".*replay_buffer_0.pt expert 1 has 3.*truncate=True"):
        import_replay_buffers(files, tmp_path / "s1", model={"name": "TinyConv"},
                              dataset="toy", spec=ParamSpec.of(TinyConv()))
    assert not (tmp_path / "s1").exists()  # nothing written before the check
    store = import_replay_buffers(files, tmp_path / "s2", model={"name": "TinyConv"},
                                  dataset="toy", spec=ParamSpec.of(TinyConv()), truncate=True)
    assert store.num_snapshots == 3 and store.num_experts == 4
    for i, expert in enumerate(originals):
        assert torch.equal(store.load_expert(i), torch.stack([flat(s) for s in expert[:3]]))


def test_import_bad_buffer_file(tmp_path):
    torch.save({"not": "a list"}, tmp_path / "replay_buffer_0.pt")
    with pytest.raises(TrajectoryStoreError, match=r"replay_buffer_0.pt: a replay buffer holds a "
                       "list of experts"):
        import_replay_buffers([tmp_path / "replay_buffer_0.pt"], tmp_path / "s",
                              model={"name": "TinyConv"}, dataset="toy",
                              spec=ParamSpec.of(TinyConv()))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        import_replay_buffers([tmp_path / "missing.pt"], tmp_path / "s",
                              model={"name": "TinyConv"}, dataset="toy",
                              spec=ParamSpec.of(TinyConv()))


def test_import_with_real_convnet_and_build_model(tmp_path):
    """MTT's buffer.py saves [p.detach().cpu() for p in net.parameters()] per snapshot."""
    model = {"name": "ConvNet", "channels": 1, "num_classes": 3, "image_size": [8, 8],
             "width": 4, "depth": 1}
    torch.manual_seed(0)
    net = ld_models.build_model(**{**model, "image_size": (8, 8)})
    expert = []
    for _ in range(3):  # three fake "epochs": perturb and snapshot
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        expert.append([p.detach().cpu().clone() for p in net.parameters()])
    torch.save([expert], tmp_path / "replay_buffer_0.pt")
    store = import_replay_buffers(tmp_path, tmp_path / "store", model=model, dataset="toy")
    rebuilt = store.build_model()  # JSON list image_size back to a tuple; spec checked
    assert store.spec == ParamSpec.of(rebuilt) == ParamSpec.of(net)
    assert torch.equal(store.final_snapshot(0), flat(expert[2]))

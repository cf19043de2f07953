"""hubconf.py through torch.hub.load(source='local'): strict loading of local files, no implicit download."""
import pytest
import torch

import hubconf
import vision_transformer as vits
from helpers import ROOT
from utils import UserError


def hub_load(entry, **kwargs):
    return torch.hub.load(ROOT, entry, source="local", **kwargs)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def vits8_weights(tmp_path_factory):
    """A ViT-S/8 saved as released weights and as a main_dino.py checkpoint (teacher with head, DDP student)."""
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=8, num_classes=0)
    folder = tmp_path_factory.mktemp("hub")
    released, training = folder / "released.pth", folder / "checkpoint.pth"
    torch.save(model.state_dict(), released)
    torch.save({"teacher": {**{"backbone." + k: v for k, v in model.state_dict().items()},
                            "head.last_layer.weight_g": torch.ones(4, 1)},
                "student": {"module.backbone." + k: v + 1 for k, v in model.state_dict().items()},
                "epoch": 2}, training)
    return model, str(released), str(training)


def test_local_files_load_strictly(vits8_weights):
    model, released, training = vits8_weights
    from_released = hub_load("dino_vits8", weights=released)
    assert same_weights(from_released, model)
    assert from_released.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 384)
    assert same_weights(hubconf.dino_vits8(weights=training), model)  # the teacher by default
    student = hubconf.dino_vits8(weights=training, checkpoint_key="student")
    assert torch.equal(student.cls_token, model.cls_token + 1)


def test_wrong_file_fails_clearly(vits8_weights, tmp_path):
    _, released, _ = vits8_weights
    with pytest.raises(UserError, match=r"does not match the backbone for vit_small/16: .*shape mismatch"):
        hub_load("dino_vits16", weights=released)  # patch 8 weights, patch 16 model
    with pytest.raises(UserError, match="checkpoint not found"):
        hubconf.dino_vits8(weights=str(tmp_path / "missing.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="broken.pth"):
        hubconf.dino_vits8(weights=str(broken))


def test_no_implicit_download(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    for entry in ("dino_vits16", "dino_vits8", "dino_vitb16", "dino_vitb8", "dino_resnet50"):
        with pytest.raises(UserError, match=r"no weights given.*weights=<local file>"):
            getattr(hubconf, entry)()
    random_vit = hub_load("dino_vits16", pretrained=False)
    assert random_vit.patch_embed.patch_size == 16 and random_vit.embed_dim == 384


def test_url_is_downloaded_once_into_the_hub_cache(vits8_weights, monkeypatch, tmp_path):
    model, released, _ = vits8_weights
    calls = []

    def fake_download(url, dst, progress=True):  # stands in for the network
        calls.append(url)
        with open(released, "rb") as src, open(dst, "wb") as out:
            out.write(src.read())
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    url = "https://weights.invalid/dino/vits8.pth"
    assert same_weights(hubconf.dino_vits8(weights=url), model)
    assert same_weights(hubconf.dino_vits8(weights=url), model)
    assert calls == [url]
    assert (tmp_path / "checkpoints" / "vits8.pth").is_file()


def test_resnet50_has_no_classifier(tmp_path):
    torch.manual_seed(0)
    random_net = hubconf.dino_resnet50(pretrained=False)
    assert isinstance(random_net.fc, torch.nn.Identity)
    path = tmp_path / "resnet50.pth"
    torch.save(random_net.state_dict(), path)  # as the released file: no fc keys
    loaded = hub_load("dino_resnet50", weights=str(path))
    assert same_weights(loaded, random_net)
    assert loaded.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 2048)

import pytest
import torch

from app.core.nets.classifier import Classifier, ClassifierConfig
from app.core.nets.gan import Discriminator, GanConfig, Generator
from app.core.nets.vae import ConditionalVAE, MixturePrior, VaeConfig


@pytest.mark.parametrize(("height", "width", "channels"), [(28, 28, 1), (8, 8, 1), (32, 24, 3)])
def test_gan_shapes(height: int, width: int, channels: int) -> None:
    cfg = GanConfig(height, width, channels, num_classes=10, g_channels=8, d_channels=8)
    z, labels = torch.randn(5, cfg.latent_dim), torch.arange(5)
    images = Generator(cfg)(z, labels)
    assert images.shape == (5, channels, height, width)
    assert images.min() >= -1 and images.max() <= 1
    assert Discriminator(cfg)(images, labels).shape == (5,)


def test_gan_extra_convs_keep_the_shape_and_add_layers() -> None:
    def convs(cfg: GanConfig) -> int:
        return sum(isinstance(m, torch.nn.Conv2d) for m in Generator(cfg).modules())

    plain = GanConfig(28, 28, 1, num_classes=10, g_channels=8)
    deeper = GanConfig(28, 28, 1, num_classes=10, g_channels=8, g_extra_convs=1)
    assert convs(deeper) == convs(plain) + deeper.n_up
    assert Generator(deeper)(torch.randn(2, 64), torch.arange(2)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="g_extra_convs"):
        GanConfig(28, 28, 1, num_classes=10, g_extra_convs=5)


def test_minibatch_std_gives_the_discriminator_the_spread_of_a_group() -> None:
    from app.core.nets.gan import MinibatchStd

    same = torch.randn(1, 3, 2, 2).repeat(8, 1, 1, 1)
    varied = torch.randn(8, 3, 2, 2)
    assert MinibatchStd()(same)[:, -1].abs().max() < 1e-3  # identical images: no spread
    assert (MinibatchStd()(varied)[:, -1] > 0.1).all()
    assert MinibatchStd()(varied[:5]).shape == (5, 4, 2, 2)  # a batch no group size divides still works
    cfg = GanConfig(28, 28, 1, num_classes=10, d_channels=8, minibatch_std=True)
    assert Discriminator(cfg)(torch.randn(5, 1, 28, 28), torch.arange(5)).shape == (5,)


def test_class_norm_lets_the_label_steer_every_generator_stage() -> None:
    cfg = GanConfig(28, 28, 1, num_classes=10, g_channels=8, class_norm=True)
    generator = Generator(cfg)
    assert len(generator.class_norms) == 2  # one table per batch norm of the two ×2 stages
    plain = Generator(GanConfig(28, 28, 1, num_classes=10, g_channels=8))
    plain.load_state_dict({k: v for k, v in generator.state_dict().items() if not k.startswith("class_norms")})
    generator.eval()
    plain.eval()
    z, labels = torch.randn(4, 64), torch.tensor([0, 3, 3, 9])
    assert torch.equal(generator(z, labels), plain(z, labels))  # zero-initialised: starts as the plain generator
    with torch.no_grad():
        generator.class_norms[0].weight[3].fill_(0.5)
    steered = generator(z, labels)
    assert torch.equal(steered[[0, 3]], plain(z, labels)[[0, 3]])  # only class 3's rows change
    assert not torch.allclose(steered[1:3], plain(z, labels)[1:3])
    assert "class_norms.0.weight" not in plain.state_dict()  # checkpoints without it load unchanged


def test_gan_label_changes_output() -> None:
    torch.manual_seed(0)
    generator = Generator(GanConfig(28, 28, 1, num_classes=10)).eval()
    z = torch.randn(1, 64).repeat(2, 1)
    images = generator(z, torch.tensor([3, 7]))
    assert not torch.allclose(images[0], images[1])


def test_unconditional_gan_and_vae() -> None:
    gan = GanConfig(8, 8, 1, num_classes=0)
    images = Generator(gan)(torch.randn(3, gan.latent_dim))
    assert Discriminator(gan)(images).shape == (3,)
    vae = ConditionalVAE(VaeConfig(8, 8, 1, num_classes=0))
    assert vae.decode(torch.randn(3, 16)).shape == (3, 1, 8, 8)
    assert vae.loss(images)["loss"].ndim == 0


@pytest.mark.parametrize(("height", "width", "channels"), [(28, 28, 1), (8, 8, 1), (30, 20, 3)])
def test_vae_api_shapes(height: int, width: int, channels: int) -> None:
    vae = ConditionalVAE(VaeConfig(height, width, channels, num_classes=4, base_channels=8)).eval()
    x, labels = torch.rand(6, channels, height, width) * 2 - 1, torch.tensor([0, 1, 2, 3, 0, 1])
    mu, logvar = vae.encode(x, labels)
    assert mu.shape == logvar.shape == (6, 16)
    assert vae.decode(mu, labels).shape == x.shape
    assert vae.reconstruct(x, labels).shape == x.shape
    path = vae.interpolate(mu[0], mu[1], steps=5, labels=torch.full((5,), 2))
    assert path.shape == (5, channels, height, width)
    assert torch.allclose(path[0], vae.decode(mu[:1], torch.tensor([2]))[0], atol=1e-5)
    losses = vae.loss(x, labels)
    assert losses["loss"] > 0 and losses["kl"] >= 0


def test_vae_label_changes_decoding() -> None:
    torch.manual_seed(0)
    vae = ConditionalVAE(VaeConfig(28, 28, 1, num_classes=10)).eval()
    z = torch.randn(1, 16).repeat(2, 1)
    images = vae.decode(z, torch.tensor([1, 8]))
    assert not torch.allclose(images[0], images[1])


def test_classifier_features_and_logits() -> None:
    model = Classifier(ClassifierConfig(8, 8, 1, num_classes=10)).eval()
    x = torch.randn(4, 1, 8, 8)
    assert model.features(x).shape == (4, 128)
    assert model(x).shape == (4, 10)


def test_unfitted_prior_is_the_standard_normal() -> None:
    vae = ConditionalVAE(VaeConfig(8, 8, 1, num_classes=3)).eval()
    z, labels = torch.randn(5, 16), torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(vae.prior(z, labels), z)
    assert torch.allclose(vae.generate(z, labels), vae.decode(z, labels))


def test_fitted_prior_draws_each_component_by_weight_and_keeps_it_under_a_temperature() -> None:
    prior = MixturePrior(num_classes=2, components=2, latent_dim=4)
    means = torch.tensor([[[10.0] * 4, [-10.0] * 4], [[0.0] * 4, [50.0] * 4]])
    prior.set_mixture(torch.tensor([[0.8, 0.2], [0.0, 1.0]]), means, torch.eye(4).repeat(2, 2, 1, 1) * 0.01)
    z = torch.randn(4000, 4, generator=torch.Generator().manual_seed(1))
    first = prior(z, torch.zeros(4000, dtype=torch.long))
    share = (first[:, 0] > 0).float().mean().item()
    assert 0.77 < share < 0.83  # the 0.8 component, picked independently of where z lies
    assert ((first[:, 0] > 0) == (z[:, 0] > 0)).float().mean() < 0.9
    assert torch.allclose(prior(z, torch.ones(4000, dtype=torch.long)).mean(0), torch.full((4,), 50.0), atol=0.1)
    cooled = prior(z * 0.5, torch.zeros(4000, dtype=torch.long))
    assert torch.equal(cooled[:, 0] > 0, first[:, 0] > 0)  # a temperature moves a sample within its component
    centre = means[0, (first[:, 0] < 0).long()]
    assert (cooled - centre).abs().max() < (first - centre).abs().max()

"""The verbs a model reaches through models/base.VERBS run as the functions they name:
under no_grad / inference_mode where those are, with the same results."""

import torch

import vrnn
from vrnn import generate, inference


def test_the_verbs_are_the_registered_functions_with_their_decorators():
    torch.manual_seed(0)
    model = vrnn.build(vrnn.VRNNConfig.preset("vrnn-gauss", x_dim=3, h_dim=8, z_dim=2))
    x = torch.randn(2, 5, 3)
    ll = model.log_likelihood(x, num_samples=3)
    lat = model.latents(x)
    s = model.sample(2, 4)
    assert not ll.requires_grad and not lat["log_px"].requires_grad  # under no_grad
    assert s.is_inference() and s.shape == (2, 4, 3)  # under inference_mode
    torch.manual_seed(1)
    a = model.log_likelihood(x, num_samples=3)
    torch.manual_seed(1)
    b = inference.log_likelihood(model, x, None, 3)
    assert torch.equal(a, b)
    torch.manual_seed(2)
    assert torch.equal(model.sample(2, 4), (torch.manual_seed(2), generate.sample(model, 2, 4))[1])

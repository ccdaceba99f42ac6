"""Prompt templates of the torchvision sources: each dataset's full list, as the ZSCL /
MoE-Adapters MTIL evaluation ensembles them (``JiazuoYu/MoE-Adapters4CL@4572d97``,
``mtil/src/datasets/collections.py``; CIFAR-10/100 share the 18 of ``mtil/src/datasets/cifar10.py``).

The first template of each list is the one the reference trains with (``training.prompt: first``);
evaluation with ``prompt: ensemble`` averages the normalised text features over all of them.
Fashion-MNIST is not in the reference; its single template is this project's.
"""
from __future__ import annotations

_CIFAR = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]

_CALTECH101 = [
    "a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.", "a sketch of a {}.",
    "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.", "a embroidered {}.", "a cartoon {}.",
    "a {} in a video game.", "a plushie {}.", "a origami {}.", "art of a {}.", "graffiti of a {}.",
    "a drawing of a {}.", "a doodle of a {}.",
    "a photo of the {}.", "a painting of the {}.", "the plastic {}.", "a sculpture of the {}.",
    "a sketch of the {}.", "a tattoo of the {}.", "the toy {}.", "a rendition of the {}.",
    "the embroidered {}.", "the cartoon {}.", "the {} in a video game.", "the plushie {}.",
    "the origami {}.", "art of the {}.", "graffiti of the {}.", "a drawing of the {}.",
    "a doodle of the {}.",
]

TEMPLATES: dict[str, list[str]] = {
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
    "mnist": ['a photo of the number: "{}".'],
    "fashion_mnist": ["a photo of a {}, a type of clothing."],
    "fgvc_aircraft": ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."],
    "caltech101": _CALTECH101,
    "dtd": ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."],
    "eurosat": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "flowers102": ["a photo of a {}, a type of flower."],
    "food101": ["a photo of a {}, a type of food."],
    "oxford_pet": ["a photo of a {}, a type of pet."],
    "stanford_cars": ["a photo of a {}, a type of car.", "a photo of a {}.", "a photo of the {}.",
                      "a photo of my {}.", "i love my {}!", "a photo of my dirty {}.", "a photo of my clean {}.",
                      "a photo of my new {}.", "a photo of my old {}."],
    "sun397": ["a photo of a {}.", "a photo of the {}."],
}


def templates_for(name: str) -> list[str]:
    """A copy of the template list of torchvision source ``name``."""
    return list(TEMPLATES[name])

"""Architectures of a user's own module, as `arch = "python:arch_fixtures:NAME"` names them
(tests/ is on the path under pytest): the contract is a function of num_classes that returns
an nn.Module whose forward gives logits."""

from __future__ import annotations

from torch import nn


def _net(width: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def tiny_teacher(num_classes: int) -> nn.Module:
    return _net(24, num_classes)


def tiny_student(num_classes: int) -> nn.Module:
    return _net(8, num_classes)


def not_a_module(num_classes: int) -> object:
    return "a string"

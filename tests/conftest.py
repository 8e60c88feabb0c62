"""Shared fixtures."""

from __future__ import annotations

import fake_datasets
import pytest


# -- tiny datasets in the real on-disk formats (written once per session, read-only) -----
@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    return root, fake_datasets.write_mnist(root)


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    return root, fake_datasets.write_cifar10(root)


@pytest.fixture(scope="session")
def fake_cifar100(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    return root, fake_datasets.write_cifar100(root)


@pytest.fixture(scope="session")
def fake_svhn(tmp_path_factory):
    root = tmp_path_factory.mktemp("svhn")
    return root, fake_datasets.write_svhn(root, extra_per_class=1)


@pytest.fixture(scope="session")
def fake_stl10(tmp_path_factory):
    root = tmp_path_factory.mktemp("stl10")
    return root, fake_datasets.write_stl10(root)


@pytest.fixture(scope="session")
def fake_image_folder(tmp_path_factory):
    return fake_datasets.write_image_folder(tmp_path_factory.mktemp("image_folder"))

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def script_module():
    """`script_module("name")`: scripts/name.py imported as a module (scripts/ is not a package), once."""
    loaded = {}

    def load(name):
        if name not in loaded:
            path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def llava_sdpa():
    from tiny_models import tiny_llava
    return tiny_llava("sdpa")


@pytest.fixture(scope="session")
def llava_eager():
    from tiny_models import tiny_llava
    return tiny_llava("eager")


@pytest.fixture(scope="session")
def random_demo():
    """The demo architecture with untrained weights: real processor and chat template, no training needed."""
    from recipe_search.demo import build
    from recipe_search.models import get_adapter

    tokenizer = build.build_tokenizer()
    processor = build.build_processor(tokenizer)
    torch.manual_seed(0)
    model = build.build_model(tokenizer).eval()
    return model, processor, get_adapter(model)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, random_demo):
    """The random demo model saved as a local checkpoint folder, for command-line tests."""
    model, processor, _ = random_demo
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

"""`jaxmoe.io.families`: the table `load_hf` / `save_hf` / the PEFT reader dispatch through. (That each family
loads and saves its checkpoints: tests/io/test_hf.py and tests/models/test_phi4mm.py; that `import jaxmoe`
imports every module that registers one: tests/test_imports.py.)"""

import pytest
from flax import nnx

import jaxmoe
from jaxmoe.io import families, hf, phi4mm
from jaxmoe.io.names import param_specs as text_param_specs
from jaxmoe.io.names_phi4mm import param_specs as mm_param_specs
from jaxmoe.io.peft import save_peft_adapter


def test_each_model_type_and_class_has_its_family():
    assert [f.model_types for f in families.registered()] == [("phi3", "phimoe"), ("phi4_multimodal",)]
    text, mm = families.for_model_type("phi3"), families.for_model_type("phi4_multimodal")
    assert families.for_model_type("phimoe") is text and text.param_specs is text_param_specs
    assert mm.param_specs is mm_param_specs and mm.save is phi4mm.save_phi4mm and text.load is not mm.load
    assert families.for_model_type("llama") is None
    tiny = nnx.eval_shape(lambda: jaxmoe.PhimoeForCausalLM(jaxmoe.get_preset("tiny-moe"), rngs=nnx.Rngs(0)))
    assert families.for_model(tiny) is text  # PhimoeForCausalLM, a Phi3ForCausalLM subclass
    assert families.for_model(object()) is None


def test_a_second_claim_on_a_model_type_or_class_is_refused():
    family = families.for_model_type("phi3")
    with pytest.raises(ValueError, match=r"claims \['phi3'\], already registered for \('phi3', 'phimoe'\)"):
        families.register(families.Family(("phi3",), (), family.param_specs, family.load, family.save))
    assert len(families.registered()) == 2


def test_writers_name_the_classes_they_know(tmp_path):
    with pytest.raises(TypeError, match=r"save_hf: model is a Linear; .*Phi3ForCausalLM, PhimoeForCausalLM, "
                                        r"Phi4MultimodalForCausalLM"):
        hf.save_hf(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path / "out")
    with pytest.raises(TypeError, match=r"PEFT adapters: .*Phi4MultimodalForCausalLM, not of Linear"):
        save_peft_adapter(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "vision", tmp_path / "out")


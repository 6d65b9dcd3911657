"""The processor against transformers' DeepseekVLProcessor / DeepseekVLHybridProcessor: ids, masks, pixels,
both message formats, batching, errors, and end to end through the model."""

import json
import os

import numpy as np
import pytest
import torch

import dvl_jax
from dvl_jax.convert import convert_checkpoint
from dvl_jax.processing import Processor
from reference import DATA, EOS, IMAGE, assistant, hf_processor, max_rel_err, user

DOG, CHART, LOGO, APP = (os.path.join(DATA, n) for n in ("dog_a.png", "chart.png", "logo.png", "app.png"))


CONVERSATIONS = {
    "no_image": [user("What is a dog?")],
    "one_image": [user(DOG, "Describe this image.")],
    "two_images": [user(DOG, "is Figure 1.", CHART, " is Figure 2. Which is brighter? ")],
    "multi_turn": [user(DOG, "Describe it."), assistant("A dog."), user("And the colour?")],
    "system_role": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, user(LOGO, "Read it.")],
}


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("proc"))
  return hf_processor(d, num_image_tokens=16, size=32), Processor.from_pretrained(d)


def _hf_inputs(ref, conversation):
  return ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                 padding=True, return_tensors="np")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_single_conversation_equals_transformers(processors, name):
  ref, ours = processors
  conversation = CONVERSATIONS[name]
  assert ours.apply_chat_template(conversation) == ref.apply_chat_template(conversation, add_generation_prompt=True)
  expected, got = _hf_inputs(ref, conversation), ours.apply_chat_template(conversation, tokenize=True, return_dict=True)
  np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
  np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
  if "pixel_values" in expected:
    n = expected["pixel_values"].shape[0]
    assert got["image_mask"].tolist() == [[True] * n]
    assert np.abs(got["pixel_values"][0] - expected["pixel_values"].transpose(0, 2, 3, 1)).max() < 1e-3
  else:
    assert "pixel_values" not in got


def test_batch_with_0_1_2_images_per_row_equals_transformers(processors):
  ref, ours = processors
  batch = [CONVERSATIONS["two_images"], CONVERSATIONS["no_image"], CONVERSATIONS["multi_turn"]]
  expected = _hf_inputs(ref, batch)
  got = ours.apply_chat_template(batch, tokenize=True, return_dict=True)
  np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])  # left-padded with EOS
  np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
  assert got["input_ids"][1, 0] == ours.tokenizer.eos_token_id and got["attention_mask"][1, 0] == 0
  assert got["image_mask"].tolist() == [[True, True], [False, False], [True, False]]
  assert got["pixel_values"].shape == (3, 2, 32, 32, 3)
  assert not got["pixel_values"][1].any() and not got["pixel_values"][2, 1].any()
  ours_flat = got["pixel_values"][got["image_mask"]]  # row-major, as transformers flattens them
  assert np.abs(ours_flat - expected["pixel_values"].transpose(0, 2, 3, 1)).max() < 1e-3


def test_original_message_format_renders_the_same_prompt(processors):
  ref, ours = processors
  original = [
      {"role": "User", "content": f"{IMAGE}Describe it.", "images": [DOG]},
      {"role": "Assistant", "content": "A dog."},
      {"role": "User", "content": f"And {IMAGE} this one?", "images": [CHART]},
      {"role": "Assistant", "content": ""},
  ]
  hf_format = [user(DOG, "Describe it."), assistant("A dog."),
               {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image", "path": CHART},
                                            {"type": "text", "text": "this one?"}]}]
  prompt = ours.apply_chat_template(original)
  # The original joins "And", the image and "this one?" with spaces; the -hf template joins text items with one.
  assert prompt == ours.apply_chat_template(original[:-1])  # the empty Assistant turn is the generation prompt
  assert prompt.endswith(f"User: {IMAGE}Describe it.\n\nAssistant: A dog.{EOS}User: And {IMAGE} this one?\n\n"
                         "Assistant:")
  assert prompt.startswith("You are a helpful language and vision assistant.")
  expected = _hf_inputs(ref, [hf_format[:2] + [user("And the colour?")]])
  got = ours.apply_chat_template([original[:2] + [{"role": "User", "content": "And the colour?"}]], tokenize=True,
                                 return_dict=True)
  np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
  inputs = ours.apply_chat_template(original, tokenize=True, return_dict=True)
  assert inputs["image_mask"].tolist() == [[True, True]]
  assert (inputs["input_ids"] == ours.tokenizer.image_token_id).sum() == 2 * 16


def test_the_documented_prompt_of_the_reference(processors):
  """ARCHITECTURE.md 3.3: the rendered one-image prompt, byte for byte."""
  _, ours = processors
  assert ours.apply_chat_template([user(DOG, "Describe this image.")]) == (
      "You are a helpful language and vision assistant. You are able to understand the visual content that the "
      "user provides, and assist the user with a variety of tasks using natural language.\n\nUser: "
      "<image_placeholder>Describe this image.\n\nAssistant:")


def test_hybrid_processor_equals_transformers(tmp_path):
  ref = hf_processor(str(tmp_path), hybrid=True, num_image_tokens=16, size=32, high_res_size=64)
  ours = Processor.from_pretrained(tmp_path)
  assert ours.image_config.is_hybrid
  batch = [CONVERSATIONS["two_images"], CONVERSATIONS["one_image"]]
  expected, got = _hf_inputs(ref, batch), ours.apply_chat_template(batch, tokenize=True, return_dict=True)
  np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
  for key in ("pixel_values", "high_res_pixel_values"):
    assert np.abs(got[key][got["image_mask"]] - expected[key].transpose(0, 2, 3, 1)).max() < 1e-3, key


# ----- transformers' calling habits -----

@pytest.mark.parametrize("name", ["one_conversation", "batch"])
def test_return_tensors_np_and_jax_equal_transformers(processors, name):
  import jax

  ref, ours = processors
  conversation = (CONVERSATIONS["one_image"] if name == "one_conversation" else
                  [CONVERSATIONS["two_images"], CONVERSATIONS["no_image"]])
  expected = ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, padding=True,
                                     return_tensors="np")  # ids [B, T]: [1, T] for one conversation
  ids = ours.apply_chat_template(conversation, tokenize=True, padding=True, return_tensors="np")
  assert isinstance(ids, np.ndarray)
  np.testing.assert_array_equal(ids, expected)
  as_jax = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_tensors="jax",
                                    padding="longest")
  assert isinstance(as_jax, jax.Array)
  np.testing.assert_array_equal(np.asarray(as_jax), expected)
  inputs = ours.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="jax",
                                    processor_kwargs={"padding": True})  # transformers 5 passes padding so
  assert all(isinstance(v, jax.Array) for v in inputs.values()), {k: type(v) for k, v in inputs.items()}
  expected = _hf_inputs(ref, conversation)
  np.testing.assert_array_equal(np.asarray(inputs["input_ids"]), expected["input_ids"])
  np.testing.assert_array_equal(np.asarray(inputs["attention_mask"]), expected["attention_mask"])
  flat = np.asarray(inputs["pixel_values"])[np.asarray(inputs["image_mask"])]
  assert np.abs(flat - expected["pixel_values"].transpose(0, 2, 3, 1)).max() < 1e-3


def test_torch_tensors_and_other_paddings_are_refused(processors):
  _, ours = processors
  conversation = CONVERSATIONS["one_image"]
  for call in (lambda: ours.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt"),
               lambda: ours(f"{IMAGE} a dog", [DOG], return_tensors="pt")):
    with pytest.raises(ValueError, match=r"return_tensors='pt' is not supported: dvl_jax returns numpy arrays.*jax"):
      call()
  with pytest.raises(ValueError, match=r"padding='max_length' is not supported.*longest prompt"):
    ours.apply_chat_template(conversation, tokenize=True, padding="max_length")
  with pytest.raises(TypeError, match=r"processor_kwargs \['truncation'\] are not supported"):
    ours.apply_chat_template(conversation, tokenize=True, processor_kwargs={"truncation": True})


MALFORMED = {
    "one_message_dict": (CONVERSATIONS["no_image"][0], TypeError, r"list of message dicts, not one dict: pass \[message\]"),
    "prompt_string": ("What is a dog?", TypeError, r"not a prompt string.*processor\(text, images\)"),
    "batch_mixed_with_message": ([CONVERSATIONS["no_image"][0], CONVERSATIONS["no_image"]], TypeError,
                                 r"Message 1 is a list.*a batch is a list of conversations"),
    "no_role": ([{"content": "Hi"}], ValueError, r"Message 0 needs a 'role' string.*got None"),
    "no_content": ([user("Hi"), {"role": "assistant"}], ValueError, r"Message 1 \(assistant\) has no 'content'"),
    "content_number": ([{"role": "user", "content": 3}], ValueError, r"Message 0 \(user\): content must be a string"),
    "content_list_of_strings": ([{"role": "user", "content": ["Hi"]}], ValueError, r"content must be a string or a list"),
    "unknown_item_type": ([{"role": "user", "content": [{"type": "video", "path": "a.mp4"}]}], ValueError,
                          r"content must be .*got \[\{'type': 'video'"),
    "batch_no_role": ([CONVERSATIONS["no_image"], [{"role": "", "content": "Hi"}]], ValueError,
                      r"Conversation 1, message 0 needs a 'role'"),
    "original_images_string": ([{"role": "User", "content": f"{IMAGE}Hi", "images": DOG}], TypeError,
                               r"'images' is a list of images.*got str"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_conversations_name_the_problem(processors, name):
  _, ours = processors
  conversation, error, match = MALFORMED[name]
  with pytest.raises(error, match=match):
    ours.apply_chat_template(conversation, tokenize=True, return_dict=True)


def test_processor_from_a_hub_id_says_how_to_download_and_convert(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # so that no local folder of that name exists
  with pytest.raises(FileNotFoundError, match=r"(?s)No processor directory at 'deepseek-community/deepseek-vl-1.3b-chat'"
                     r".*does not download from the Hub.*`hf download deepseek-community/deepseek-vl-1.3b-chat "
                     r"--local-dir DIR`.*`python convert/torch_to_orbax.py --src DIR --dst CKPT`"):
    Processor.from_pretrained("deepseek-community/deepseek-vl-1.3b-chat")
  with pytest.raises(FileNotFoundError, match="No processor directory") as err:
    Processor.from_pretrained(tmp_path / "missing")  # an absolute path is no Hub id
  assert "Hub" not in str(err.value)


def test_decode_refuses_a_batch(processors):
  _, ours = processors
  with pytest.raises(TypeError, match="use batch_decode"):
    ours.decode(np.zeros((2, 3), np.int32))


# ----- bad input -----

def test_placeholder_and_image_counts_must_agree(processors):
  _, ours = processors
  with pytest.raises(ValueError, match=r"Prompt 0 has 2 <image_placeholder> placeholder\(s\) but 1 image\(s\)"):
    ours(f"{IMAGE} and {IMAGE}", [DOG])
  with pytest.raises(ValueError, match=r"Prompt 1 has 0 .* but 1 image"):
    ours([f"{IMAGE} a", "b"], [[DOG], [DOG]])


def test_prompt_longer_than_the_context_says_length_and_limit(processors):
  _, ours = processors
  limited = Processor(ours.tokenizer, ours.image_config, num_image_tokens=16, max_length=40)
  with pytest.raises(ValueError, match=r"Prompt 0 is \d+ tokens long \(2 image\(s\) x 16 tokens included\), over the "
                     r"model's limit of 40"):
    limited(f"{IMAGE}{IMAGE} describe both", [DOG, CHART])


def test_unreadable_image_names_the_file(processors, tmp_path):
  _, ours = processors
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  with pytest.raises(ValueError, match=r"broken\.png"):
    ours.apply_chat_template([user(str(bad), "What is it?")], tokenize=True, return_dict=True)


# ----- end to end -----

def test_messages_to_logits_equal_transformers(tmp_path):
  """A real image through our processor and model vs the transformers processor and model, same tiny weights."""
  from reference import hf_model_for_processor

  ref_proc = hf_processor(str(tmp_path / "hf"), num_image_tokens=16, size=32)
  model = hf_model_for_processor(ref_proc, str(tmp_path / "hf"))
  convert_checkpoint(tmp_path / "hf", tmp_path / "dvl", log=lambda *_: None)

  ours_proc, ours = Processor.from_pretrained(tmp_path / "dvl"), dvl_jax.load(tmp_path / "dvl")
  batch = [CONVERSATIONS["one_image"], CONVERSATIONS["two_images"]]
  inputs = ours_proc.apply_chat_template(batch, tokenize=True, return_dict=True)
  logits = ours(**inputs)
  ref_inputs = ref_proc.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            padding=True, return_tensors="pt")
  mask = ref_inputs["attention_mask"]
  pos = mask.cumsum(-1) - 1
  pos.masked_fill_(mask == 0, 1)
  with torch.no_grad():
    expected = model(**ref_inputs, position_ids=pos).logits.numpy()
  assert max_rel_err(logits, expected, inputs["attention_mask"]) < 1e-4
  top = np.asarray(logits[:, -1]).argmax(-1)
  assert ours_proc.batch_decode(top[:, None]) == ref_proc.batch_decode(top[:, None], skip_special_tokens=True)


def test_original_checkpoint_processor_configs(tmp_path):
  """deepseek-ai/* ship VLMImageProcessor configs: the 1.3B one describes the 384 px image; the 7B one only the
  1024 px image, so the model config (dvl_config.json of a converted checkpoint) completes the hybrid split."""
  from reference import write_tokenizer

  write_tokenizer(str(tmp_path))
  original = {"image_processor_type": "VLMImageProcessor", "image_size": 384, "min_size": 14, "do_normalize": False,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255,
              "background_color": [127, 127, 127]}
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(original))
  cfg = Processor.from_pretrained(tmp_path).image_config
  assert (cfg.size, cfg.rounding, cfg.exif_transpose, cfg.is_hybrid, cfg.background) == (384, "floor", False, False,
                                                                                        (127, 127, 127))
  clip = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({**original, "image_size": 1024, **clip}))
  model = dvl_jax.deepseek_vl_7b()
  (tmp_path / "dvl_config.json").write_text(json.dumps({"format": "dvl_jax/1", "model": model.to_dict()}))
  processor = Processor.from_pretrained(tmp_path)
  cfg = processor.image_config
  assert (cfg.high_res_size, cfg.size, cfg.resample, cfg.image_mean) == (1024, 384, 2, (0.5, 0.5, 0.5))
  assert cfg.high_res_background == (122, 116, 104) and processor.num_image_tokens == 576
  assert processor.max_length == model.text.max_position_embeddings


@pytest.mark.slow
def test_generate_then_batch_decode_equals_transformers(tmp_path):
  """transformers users write `processor.batch_decode(model.generate(**inputs))`: with our GenerationOutput it
  decodes each row's new tokens, the text transformers' output holds after the prompt."""
  from reference import hf_model_for_processor

  ref_proc = hf_processor(str(tmp_path / "hf"), num_image_tokens=16, size=32)
  model = hf_model_for_processor(ref_proc, str(tmp_path / "hf"))
  convert_checkpoint(tmp_path / "hf", tmp_path / "dvl", log=lambda *_: None)
  ours_proc, ours = Processor.from_pretrained(tmp_path / "dvl"), dvl_jax.load(tmp_path / "dvl")
  batch = [CONVERSATIONS["one_image"], CONVERSATIONS["no_image"]]
  out = ours.generate(**ours_proc.apply_chat_template(batch, tokenize=True, return_dict=True), max_new_tokens=6)
  ref_inputs = ref_proc.apply_chat_template(batch, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            padding=True, return_tensors="pt")
  with torch.no_grad():
    ref_out = model.generate(**ref_inputs, max_new_tokens=6, do_sample=False)
  new = ref_out[:, ref_inputs["input_ids"].shape[1]:]
  texts = ours_proc.batch_decode(out)
  assert texts == ref_proc.batch_decode(new, skip_special_tokens=True) and any(texts), texts
  assert ours_proc.decode(out[1]) == ref_proc.decode(new[1], skip_special_tokens=True)
  np.testing.assert_array_equal(out.sequences[:, :new.shape[1]], new.numpy())

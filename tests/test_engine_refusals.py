"""Bad input that only vLLM's engine or parser can find: still one line
naming the problem and the fix, exit 1, nothing lost."""

from conftest import nothing_left, refused, small_filesystem

LOAD, SAVE = "load_sharded_state.py", "save_sharded_state.py"


def test_prompt_longer_than_the_context(checkpoints):
    # Only the engine knows its context length: refused after it starts, still in one line.
    line = refused("a prompt longer than the context", LOAD, "--model", str(checkpoints(1, 1)), "--enforce-eager",
                   "--max-model-len", "32", "--prompt", "The quick brown fox " * 20, within=None)
    assert "maximum" in line and " 32 " in line and "--max-model-len" in line


def test_unknown_engine_flag(tiny_model, tmp_path):
    # vLLM's parser knows its flags, so this one is caught only after vLLM is imported.
    line = refused("save: an unknown engine flag", SAVE, "--model", str(tiny_model), "--output", str(tmp_path / "out"),
                   "--tensor-parallel-sise", "2", within=None)
    assert "unrecognized arguments: --tensor-parallel-sise" in line
    nothing_left(tmp_path / "out")


def test_engine_flag_vllm_refuses(tiny_model, tmp_path):
    # vLLM checks some flags against the model only as it builds the engine's config.
    line = refused("save: --max-model-len beyond the model's", SAVE, "--model", str(tiny_model), "--output",
                   str(tmp_path / "out"), "--max-model-len", "100000", within=None)
    assert "vLLM refused the engine flags" in line and "max_model_len (100000)" in line, line
    nothing_left(tmp_path / "out")


def test_disk_full_during_save(tiny_model, tmp_path):
    """The tiny checkpoint is 1.4 MB: a 1 MiB filesystem fills up while a worker writes."""
    with small_filesystem(tmp_path / "small", "1m") as small:
        line = refused("save: disk full during the save", SAVE, "--model", str(tiny_model), "--output",
                       str(small / "out"), "--enforce-eager", within=None)
        assert "No space left on device while writing" in line and "nothing was saved" in line
        assert "model-rank-0-part-0.safetensors" in line  # the file being written, not just the folder
        assert list(small.iterdir()) == []


def test_vllm_save_hook_on_the_cpu_build(tiny_model, tmp_path):
    # vLLM's CPU build repacks linear weights after loading: its hook would save a model without them.
    line = refused("save: --vllm-save-hook on vLLM's CPU build", SAVE, "--model", str(tiny_model), "--output",
                   str(tmp_path / "out"), "--vllm-save-hook", within=None)
    assert "CPU build" in line and "drop --vllm-save-hook" in line
    nothing_left(tmp_path / "out")


def raised_in(path: str, error: str = "ValueError") -> Exception:
    try:
        exec(compile(f"raise {error}('bad')", path, "exec"))
    except Exception as e:
        return e
    raise AssertionError("nothing raised")


def test_an_error_of_the_model_is_not_blamed_on_the_request():
    """vLLM's own checks of a request (the prompt above) name the request's flags as the fix; a ValueError
    raised while the model runs (an in-process engine passes it on as it is: a tiny DeepSeek-V2 with a
    latent size vLLM's CPU MLA kernel does not take) does not."""
    from presharded.vllm_compat import is_request_error

    assert is_request_error(raised_in("/site-packages/vllm/v1/engine/input_processor.py"))
    assert not is_request_error(raised_in("/site-packages/vllm/model_executor/layers/attention/mla_attention.py"))


def test_an_image_without_its_placeholder():
    """vLLM's multi-modal processor asserts that the prompt has a place for the image (`Failed to apply
    prompt replacement for mm_items['image'][0]`): the line says to put the placeholder in --prompt."""
    from presharded.vllm_compat import is_image_error, is_request_error

    error = raised_in("/site-packages/vllm/multimodal/processing/processor.py", "AssertionError")
    assert is_image_error(error) and is_request_error(error)
    elsewhere = raised_in("/site-packages/vllm/model_executor/models/idefics3.py", "AssertionError")
    assert not is_image_error(elsewhere) and not is_request_error(elsewhere)

"""A real llama.cpp server (``infra/llamacpp_server.sh``, llama-cpp-python) with a small context window: a prompt
that does not fit is answered HTTP 400, which the HTTP engine raises as LLMContextOverflowError and
generate_each turns into that prompt's reason, while the batch's other prompt keeps its completion."""
import pytest

from autoif.llm import LLMContextOverflowError, generate_each, usage_scope
from autoif.llm.openai_http import OpenAIHTTPLLM
from tests.test_real_servers import ScriptServer

pytestmark = pytest.mark.slow

LONG = " ".join(f"word{i}" for i in range(2000))


@pytest.fixture(scope="module")
def small_ctx_server(tmp_path_factory):
    server = ScriptServer("llamacpp_server.sh", "AUTOIF_LLAMACPP_PORT", tmp_path_factory.mktemp("llamacpp_small_ctx"))
    server.env["AUTOIF_LLAMACPP_N_CTX"] = "256"
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_longer_than_the_servers_context(small_ctx_server, chat):
    llm = OpenAIHTTPLLM(small_ctx_server, "gemma3-270m", chat=chat, max_retries=1, backoff_s=0.01, timeout_s=120)
    with pytest.raises(LLMContextOverflowError, match="HTTP 400.*maximum context length is 256") as info:
        llm.generate(["The capital of France is", LONG], max_tokens=8, seed=1)
    assert info.value.prompt_index == 1 and llm.usage.retries == 0
    with usage_scope() as u:
        gens = generate_each(llm, ["The capital of France is", LONG], max_tokens=8, seed=1)
    assert gens.errors == [None, "prompt_too_long"] and gens.texts[1] is None and len(gens.texts[0]) == 1
    assert (u.requests, u.completions, u.errors) == (2, 1, {"http_400": 1})

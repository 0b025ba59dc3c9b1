"""The chat page at / in headless Chromium (Debian's chromium and chromium-driver, through Selenium).

`scripts/install-chromium.sh` installs them; CI runs it before the tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import KEY, MODEL

from lmforge.infer.generate import generate
from lmforge.infer.sampling import SamplingParams

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (scripts/install-chromium.sh)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def ask(browser, url: str, key: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url)
    browser.find_element(By.ID, "key").send_keys(key)
    for field, value in (("temperature", "0"), ("max_tokens", "12")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "input").send_keys(text)
    browser.find_element(By.ID, "send").click()


def test_chat_page_streams_a_reply(browser, server, tiny, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model, tokenizer = tiny
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who is Romeo?"}])
    expected = generate(model, tokenizer, [tokenizer.encode(prompt)], SamplingParams(max_new_tokens=12))[0].text

    ask(browser, server.url + "/", KEY, "Who is Romeo?")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
    reply = browser.find_element(By.CSS_SELECTOR, ".assistant .text").get_attribute("textContent")
    assert reply == expected
    assert browser.find_element(By.CSS_SELECTOR, ".user .text").text == "Who is Romeo?"
    assert browser.find_element(By.ID, "model").text == f"model: {MODEL}"
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.save_screenshot(str(tmp_path / "chat.png"))  # kept in pytest's tmp dir for a person to look at


def test_chat_page_shows_a_wrong_key(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ask(browser, server.url + "/", "wrong-key-0123456789abcdef", "hello")
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
    assert "invalid API key" in browser.find_element(By.ID, "error").text


@pytest.fixture(scope="module")
def adapter_server(tiny, tmp_path_factory):
    """A server of the tiny model with one LoRA adapter, `support`, beside it; and that adapter's directory."""
    import copy

    import torch
    from serve_helpers import Server

    from lmforge.adapters import apply_lora, save_adapter
    from lmforge.infer.engine import Engine
    from lmforge.model.lora import LoraSettings, lora_layers
    from lmforge.serve.app import create_app
    from lmforge.serve.security import ApiKeys
    from lmforge.serve.settings import ServeSettings

    model, tokenizer = tiny
    tuned = apply_lora(copy.deepcopy(model), LoraSettings(r=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    path = save_adapter(tuned, tmp_path_factory.mktemp("adapters") / "support", base=MODEL)
    app = create_app(Engine(model, tokenizer), ServeSettings(model_name=MODEL, api_keys=ApiKeys([KEY])))
    app.state.adapters.load("support", path)
    with Server(app) as s:
        yield s, path


def test_chat_page_picks_an_adapter_and_gets_its_reply(browser, adapter_server, tiny):
    import copy

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from lmforge.adapters import apply_adapter
    from lmforge.loaded import LoadedModel

    server, path = adapter_server
    model, tokenizer = tiny
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Who is Romeo?"}]))
    merged = apply_adapter(LoadedModel(copy.deepcopy(model), tokenizer), path, merge=True).model
    expected = generate(merged, tokenizer, [ids], SamplingParams(max_new_tokens=12))[0].text
    assert expected != generate(model, tokenizer, [ids], SamplingParams(max_new_tokens=12))[0].text

    browser.get(server.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEY)
    picker = browser.find_element(By.ID, "models")
    picker.click()  # the key field's change event lists the models
    WebDriverWait(browser, 30).until(lambda b: len(Select(picker).options) == 2)
    assert [o.text for o in Select(picker).options] == [MODEL, f"support (adapter of {MODEL})"]
    Select(picker).select_by_value("support")
    for field, value in (("temperature", "0"), ("max_tokens", "12")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "input").send_keys("Who is Romeo?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
    assert browser.find_element(By.CSS_SELECTOR, ".assistant .text").get_attribute("textContent") == expected
    assert browser.find_element(By.ID, "model").text == "model: support"
    assert browser.find_element(By.ID, "error").text == ""


def test_chat_page_json_mode_sends_response_format(browser, server):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    question = "List three cities as JSON."
    expected = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0,
                                "max_tokens": 12, "response_format": {"type": "json_object"}}
                          ).json()["choices"][0]["message"]["content"]
    assert expected.lstrip().startswith("{")  # the grammar's first character, which the free model does not write

    browser.get(server.url + "/")
    browser.find_element(By.ID, "json_mode").click()
    browser.find_element(By.ID, "key").send_keys(KEY)
    for field, value in (("temperature", "0"), ("max_tokens", "12")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "input").send_keys(question)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
    assert browser.find_element(By.CSS_SELECTOR, ".assistant .text").get_attribute("textContent") == expected
    assert browser.find_element(By.ID, "error").text == ""


CALL = ['Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}}\n</tool_call>']
WEATHER_TOOLS = ('[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", '
                 '"properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}}}}]')


@pytest.fixture(scope="module")
def tool_server(tiny):
    """A server whose engine calls get_weather, then answers once the tool's result is in the prompt."""
    from serve_helpers import Server
    from test_tools import ScriptedEngine

    from lmforge.serve.app import create_app
    from lmforge.serve.security import ApiKeys
    from lmforge.serve.settings import ServeSettings

    class ToolEngine(ScriptedEngine):
        def stream(self, requests):
            prompt = self.tokenizer.decode(requests[0].prompt)
            self.pieces = ["It is 19 degrees in Lima."] if "<tool_response>" in prompt else CALL
            return super().stream(requests)

    engine = ToolEngine(tiny[1], CALL)
    with Server(create_app(engine, ServeSettings(model_name=MODEL, api_keys=ApiKeys([KEY])))) as s:
        yield s, engine


def test_chat_page_tool_call_round_trip(browser, tool_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, engine = tool_server
    browser.get(server.url + "/")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#tools_box summary").click()
    browser.find_element(By.ID, "tools").send_keys(WEATHER_TOOLS)
    browser.find_element(By.ID, "input").send_keys("Weather in Lima?")
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']"))
    assert browser.find_element(By.ID, "error").text == ""
    assert browser.find_element(By.CSS_SELECTOR, ".assistant .text").get_attribute("textContent") == "Let me check."
    block = browser.find_element(By.CSS_SELECTOR, ".tool-call")
    assert block.get_attribute("open") is None  # collapsed until clicked
    block.find_element(By.TAG_NAME, "summary").click()
    summary = block.find_element(By.TAG_NAME, "summary").text
    assert summary.startswith("get_weather (call_")
    assert block.find_element(By.TAG_NAME, "pre").text == '{"city": "Lima", "unit": "C"}'
    assert "get_weather" in engine.prompts[0]  # the tools reached the prompt

    block.find_element(By.CSS_SELECTOR, ".tool-result input").send_keys('{"temperature": 19}')
    block.find_element(By.CSS_SELECTOR, ".tool-result button").click()
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == 2)
    assert browser.find_element(By.ID, "error").text == ""
    replies = browser.find_elements(By.CSS_SELECTOR, ".assistant .text")
    assert replies[1].get_attribute("textContent") == "It is 19 degrees in Lima."
    assert browser.find_element(By.CSS_SELECTOR, ".tool .text").text == '{"temperature": 19}'
    # The second request carried the call and its result: the prompt has both.
    second = engine.prompts[1]
    assert '"name": "get_weather"' in second and '<tool_response>\n{"temperature": 19}\n</tool_response>' in second

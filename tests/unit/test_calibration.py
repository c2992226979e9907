"""The estimator's learned figures: where they apply, their bounds, and the server-tool fee."""

from __future__ import annotations

from nexus_extproc.request.calibration import EXTRA_MAX, RATIO_MAX, RATIO_MIN, SERVER_TOOL_PRIOR_TOKENS, Calibrator


async def test_plain_exact_prompt_is_a_count_not_an_estimate():
    c = Calibrator()
    c.observe("gpt-4o", "exact", "plain", ours=100, provider=300, tool_calls=0)
    await c.sync(None)
    assert c.adjust("gpt-4o", "exact", "plain", 100, 0).prompt_tokens == 100


async def test_model_key_first_then_all_models_key():
    c = Calibrator()
    c.observe("claude-a", "approximation", "plain", ours=100, provider=50 * 2, tool_calls=0)
    c.observe("claude-b", "approximation", "plain", ours=100, provider=300, tool_calls=0)
    await c.sync(None)
    assert c.adjust("claude-a", "approximation", "plain", 100, 0).prompt_tokens == 100
    assert c.adjust("claude-b", "approximation", "plain", 100, 0).prompt_tokens == 300
    # a model never seen uses all models' pooled ratio (400 / 200)
    assert c.adjust("claude-new", "approximation", "plain", 100, 0).prompt_tokens == 200


async def test_ratio_is_bounded():
    c = Calibrator()
    c.observe("m", "heuristic", "plain", ours=10, provider=10_000, tool_calls=0)
    c.observe("n", "heuristic", "thinking", ours=10_000, provider=1, tool_calls=0)
    await c.sync(None)
    assert c.adjust("m", "heuristic", "plain", 100, 0).prompt_tokens == 100 * RATIO_MAX
    assert c.adjust("n", "heuristic", "thinking", 100, 0).prompt_tokens == 100 * RATIO_MIN


async def test_server_tools_reserve_results_and_calls():
    c = Calibrator()
    before = c.adjust("claude-x", "approximation", "server_tools", 40, 1)
    assert (before.prompt_tokens, before.tool_calls) == (40 + SERVER_TOOL_PRIOR_TOKENS, 1)
    c.observe("claude-x", "approximation", "server_tools", ours=40, provider=10_040, tool_calls=3)
    c.observe("claude-x", "approximation", "server_tools", ours=60, provider=30_060, tool_calls=1)
    await c.sync(None)
    after = c.adjust("claude-x", "approximation", "server_tools", 50, 1)
    assert (after.prompt_tokens, after.tool_calls) == (50 + 20_000, 2)
    c.observe("claude-y", "approximation", "server_tools", ours=1, provider=10**9, tool_calls=0)
    await c.sync(None)
    assert c.adjust("claude-y", "approximation", "server_tools", 1, 1).prompt_tokens == 1 + EXTRA_MAX


async def test_disabled_changes_nothing():
    c = Calibrator(enabled=False)
    c.observe("m", "heuristic", "plain", ours=10, provider=20, tool_calls=0)
    await c.sync(None)
    a = c.adjust("m", "heuristic", "server_tools", 10, 1)
    assert (a.prompt_tokens, a.tool_calls, c.snapshot()) == (10, 0, [])


async def test_keys_are_bounded():
    c = Calibrator(max_keys=10)
    for i in range(100):
        c.observe(f"m{i}", "heuristic", "plain", ours=10, provider=20, tool_calls=0)
    await c.sync(None)
    assert len(c.snapshot()) <= 10

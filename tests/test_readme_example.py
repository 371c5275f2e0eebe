"""The README's own-flax-model example, run exactly as printed there."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example() -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    m = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its example block"
    return m.group(1)


def test_readme_example_unlearns_a_users_own_flax_cnn_with_dmm():
    scope: dict = {}
    exec(compile(readme_example(), "README.md example", "exec"), scope)  # noqa: S102 - our own README
    before, after, memorised = scope["before"], scope["after"], scope["memorised"]
    k, n = scope["K"], scope["n"]
    assert scope["targets"].shape == (k, n + 360, 10)
    assert after["mean"] < before["mean"] - 2.0 and after["retain"] < 0.6 * before["retain"]
    assert after["val"] < 0.6 * before["val"]
    assert memorised(scope["logits"](*scope["full"])) > 0.9  # the full models fit the wrong labels...
    assert memorised(scope["logits"](scope["p"], scope["s"])) < 0.2  # ...the unlearned ones no longer do
    assert float(scope["cost"][0]) == 10 * 6 * 64  # 10 epochs of (5·20 + 280 capped retain) / 64 -> 6 batches

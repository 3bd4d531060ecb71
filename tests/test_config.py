"""Bad job files: one line naming file, line and field; exit status 2; never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from crawler import ConfigError, load_job
from tests.conftest import crawler_command, subprocess_env

GOOD = """\
api:
  base_url: sandbox
  requests_per_second: 5
budget:
  max_credits: 100
output:
  dir: out
targets:
  - {product_id: "1729679758111249333", region: US}
  - {product_id: "1729679758111249334", regions: [US, GB]}
"""

CASES = {
    "yaml syntax": (
        GOOD.replace("  requests_per_second: 5", "   requests_per_second: 5"),
        ":3: YAML syntax error: mapping values are not allowed",
    ),
    "a key given twice": (
        GOOD.replace("max_credits: 100", "max_credits: 100\n  max_credits: 999999"),
        ":6: max_credits: given twice in one mapping (first on line 5); say it once",
    ),
    "a target's key given twice": (
        GOOD.replace("region: US}", "region: US, region: GB}"),
        ":9: region: given twice in one mapping (first on line 9); say it once",
    ),
    "unknown key": (
        GOOD.replace("requests_per_second", "requests_per_secnd"),
        ":3: api.requests_per_secnd: unknown key 'requests_per_secnd'; did you mean "
        "'requests_per_second'?",
    ),
    "UK for a region": (
        GOOD.replace("region: US}", "region: UK}"),
        ":9: targets[0].region: 'UK' is not a region: GB is the United Kingdom",
    ),
    "non-digit product": (
        GOOD.replace('"1729679758111249334"', '"17296x"'),
        ":10: targets[1].product_id: '17296x' is not a product id",
    ),
    "unquoted product id": (
        GOOD.replace('"1729679758111249334"', "1729679758111249334"),
        ":10: targets[1].product_id: 1729679758111249334 must be quoted",
    ),
    "zero rate": (
        GOOD.replace("requests_per_second: 5", "requests_per_second: 0"),
        ":3: api.requests_per_second: Input should be greater than 0 (got 0)",
    ),
    "negative budget": (
        GOOD.replace("max_credits: 100", "max_credits: -5"),
        ":5: budget.max_credits: Input should be greater than 0 (got -5)",
    ),
    "typo in a target": (
        GOOD.replace("regions: [US, GB]}", "regions: [US, GB], max_page: 3}"),
        ":10: targets[1].max_page: unknown key 'max_page'; did you mean 'max_pages'?",
    ),
    "unknown region": (
        GOOD.replace("region: US}", "region: XX}"),
        ":9: targets[0].region: unknown region 'XX'; one of US, GB, DE",
    ),
    "a country for a region": (
        GOOD.replace("regions: [US, GB]}", "regions: [US, Germany]}"),
        ":10: targets[1].regions: 'Germany' is not a region: DE is Germany",
    ),
    "a misspelt top-level key": (
        GOOD + "target_file: ids.txt\n",
        ":11: target_file: unknown key 'target_file'; did you mean 'targets_file'?",
    ),
    "a key in the wrong section": (
        GOOD.replace("  requests_per_second: 5\n", "  requests_per_second: 5\n  max_credits: 9\n"),
        ":4: api.max_credits: unknown key 'max_credits'; it goes under budget",
    ),
    "no targets": (
        GOOD.split("targets:", maxsplit=1)[0] + "targets: []\n",
        ":8: targets: no targets",
    ),
    "missing budget": (GOOD.replace("budget:\n  max_credits: 100\n", ""), "budget: required key"),
    "plain http": (
        GOOD.replace("base_url: sandbox", "base_url: http://api.example.com"),
        ":2: api.base_url: 'http://api.example.com' must use https",
    ),
    "duplicate target": (
        GOOD + '  - {product_id: "1729679758111249333", region: US}\n',
        "targets[2]: product 1729679758111249333 in US is already listed at targets[0]",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_job_file_names_the_problem(tmp_path: Path, case: str):
    text, expected = CASES[case]
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    assert str(caught.value).startswith(str(path))
    assert expected in str(caught.value)
    if case != "no targets":
        assert "no targets" not in str(caught.value)


def test_good_job_file_expands_regions(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD)
    job = load_job(path)
    assert [t.key for t in job.targets] == [
        "1729679758111249333:US",
        "1729679758111249334:US",
        "1729679758111249334:GB",
    ]
    assert job.output.dir == tmp_path / "out"


@pytest.mark.parametrize("case", ["unknown key", "yaml syntax", "UK for a region"])
def test_cli_exit_status_2_without_traceback(tmp_path: Path, case: str):
    path = tmp_path / "job.yaml"
    path.write_text(CASES[case][0])
    done = subprocess.run(
        crawler_command("run", str(path)),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert CASES[case][1] in done.stderr


def test_missing_key_variable_is_named(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD.replace("base_url: sandbox", "key_env: MY_KEYAPI_KEY"))
    env = subprocess_env()
    env.pop("MY_KEYAPI_KEY", None)
    done = subprocess.run(
        crawler_command("run", str(path)),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "environment variable MY_KEYAPI_KEY is not set" in done.stderr
    assert "Traceback" not in done.stderr


def test_merge_keys_still_load(tmp_path: Path):
    """The duplicate-key check leaves YAML's merge keys alone: a target built from an anchor."""
    text = GOOD.replace(
        '  - {product_id: "1729679758111249334", regions: [US, GB]}\n',
        '  - &base {product_id: "1729679758111249334", regions: [US, GB]}\n'
        '  - <<: *base\n    product_id: "1729679758111249335"\n',
    )
    path = tmp_path / "job.yaml"
    path.write_text(text)
    job = load_job(path)
    assert [(t.product_id, t.region) for t in job.targets][-2:] == [
        ("1729679758111249335", "US"),
        ("1729679758111249335", "GB"),
    ]

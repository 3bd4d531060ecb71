"""Targets from a CSV or a list of ids beside the job file: every bad row named, no duplicates."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from crawler import ConfigError, load_job, run_job
from crawler.targets import MAX_ERRORS
from tests.conftest import (
    ENV,
    PRODUCTS,
    crawler_command,
    expected_ids,
    output_ids,
    subprocess_env,
)

HEAD = """\
api: {base_url: sandbox}
budget: {max_credits: 100}
output: {dir: out}
"""


def _job(folder: Path, extra: str, targets: str, name: str = "targets.csv") -> Path:
    (folder / name).write_text(targets, encoding="utf-8")
    path = folder / "job.yaml"
    path.write_text(HEAD + extra)
    return path


def test_a_csv_with_header_caps_blank_lines_and_extra_columns(tmp_path: Path):
    text = (
        "\ufeffproduct_id,region,title,max_pages\n"  # a BOM, as spreadsheets write
        "1729679758111249333,US,tea,\n"
        "\n"
        " 1729679758111249333 , GB ,tea,3\n"
        "0012345678,DE,zeros kept,\n"
    )
    job = load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    assert [(t.product_id, t.region, t.max_pages) for t in job.targets] == [
        ("1729679758111249333", "US", None),
        ("1729679758111249333", "GB", 3),
        ("0012345678", "DE", None),
    ]


def test_a_list_of_ids_takes_the_default_regions(tmp_path: Path):
    extra = "targets_file: ids.txt\ndefault_regions: [US, GB]\n"
    text = "# a watch list\n1729679758111249333\n\n1729679758111249334\n"
    job = load_job(_job(tmp_path, extra, text, name="ids.txt"))
    assert [t.key for t in job.targets] == [
        "1729679758111249333:US",
        "1729679758111249333:GB",
        "1729679758111249334:US",
        "1729679758111249334:GB",
    ]


def test_inline_targets_and_a_file_together(tmp_path: Path):
    extra = (
        "default_regions: [FR]\n"
        "targets_file: targets.csv\n"
        "targets:\n"
        '  - {product_id: "1729679758111249335"}\n'
        '  - {product_id: "1729679758111249336", region: US}\n'
    )
    job = load_job(_job(tmp_path, extra, "product_id\n1729679758111249333\n"))
    assert [t.key for t in job.targets] == [
        "1729679758111249335:FR",
        "1729679758111249336:US",
        "1729679758111249333:FR",
    ]


def test_every_bad_row_is_named_up_to_a_cap(tmp_path: Path):
    good = [f"{1729679758111249333 + i},US\n" for i in range(5)]
    bad = [f"17296797581112{i:05d},UK\n" for i in range(MAX_ERRORS + 5)]
    text = "product_id,region,max_pages\n" + "".join(good)
    text += "1.72968E+18,US,\n1729679758111249333,US,\n1729679758111249399,US,0\n"
    text += "".join(f"{line.strip()},\n" for line in bad)
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    lines = str(caught.value).splitlines()
    csv = tmp_path / "targets.csv"
    assert lines[0] == (
        f"{csv}:7: product_id: '1.72968E+18' is not a product id (a string of digits): a "
        "spreadsheet made it a number"
    )
    assert lines[1] == f"{csv}:8: product 1729679758111249333 in US is already listed at line 2"
    assert lines[2] == f"{csv}:9: max_pages: '0' is not a whole number above 0"
    assert lines[3] == f"{csv}:10: region: 'UK' is not a region: GB is the United Kingdom"
    assert len(lines) == MAX_ERRORS + 1
    assert lines[-1] == f"... and 8 more bad targets ({MAX_ERRORS + 8} in all)"


def test_a_duplicate_across_the_job_file_and_the_targets_file(tmp_path: Path):
    extra = (
        'targets_file: targets.csv\ntargets:\n  - {product_id: "1729679758111249333", region: US}\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, extra, "product_id,region\n1729679758111249333,US\n"))
    assert str(caught.value) == (
        f"{tmp_path / 'targets.csv'}:2: product 1729679758111249333 in US is already listed at "
        f"{tmp_path / 'job.yaml'}: targets[0]"
    )


@pytest.mark.parametrize(
    ("extra", "text", "expected"),
    [
        ("targets_file: ids.txt\n", "1729679758111249333\n", "needs default_regions"),
        ("targets_file: ids.txt\n", "product,region\n", "needs default_regions"),
        ("targets_file: missing.csv\n", None, "cannot read targets_file"),
        (
            "targets_file: ids.txt\ndefault_regions: [US]\n",
            "1729679758111249333,US\n",
            "a CSV needs a header row naming product_id",
        ),
        ("targets_file: ids.txt\n", "product_id\n1729679758111249333\n", "no 'region' column"),
        ("targets_file: ids.txt\ndefault_regions: [UK]\n", "1\n", "GB is the United Kingdom"),
        ("targets_file: ids.txt\ndefault_regions: [XX]\n", "1\n", "unknown region 'XX'; one of"),
    ],
)
def test_targets_file_problems_are_named(tmp_path: Path, extra, text, expected):
    path = tmp_path / "job.yaml"
    path.write_text(HEAD + extra)
    if text is not None:
        (tmp_path / "ids.txt").write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_job(path)


def test_bad_rows_exit_2_without_traceback(tmp_path: Path):
    job = _job(tmp_path, "targets_file: targets.csv\n", "product_id,region\nabc,US\n1,XX\n")
    done = subprocess.run(
        crawler_command("plan", str(job)),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        f"crawler: {tmp_path / 'targets.csv'}:2: product_id: 'abc' is not a product id (a string "
        "of digits)",
        f"crawler: {tmp_path / 'targets.csv'}:3: region: unknown region 'XX'; one of US, GB, DE, "
        "FR, IT, ID, MY, MX, PH, SG, ES, TH, VN, BR, JP, IE",
    ]


async def test_a_job_from_a_targets_file_crawls_exactly(tmp_path: Path, served):
    url, box = served
    rows = "".join(f"{p},{r}\n" for p in PRODUCTS[:4] for r in ("US", "DE"))
    path = _job(tmp_path, "targets_file: targets.csv\n", "product_id,region\n" + rows)
    path.write_text(
        path.read_text()
        .replace("base_url: sandbox", f"base_url: '{url}', requests_per_second: 500")
        .replace("max_credits: 100", "max_credits: 100000")
    )
    job = load_job(path)
    assert (await run_job(job, environ=ENV)).exit_status == 0
    ids = output_ids(job.output.dir)
    pairs = [(p, r) for p in PRODUCTS[:4] for r in ("US", "DE")]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, pairs)


def _load_seconds(path: Path) -> tuple[float, str]:
    """Seconds ``load_job`` took, and what it refused (the empty string: nothing)."""
    started = time.perf_counter()
    try:
        load_job(path)
    except ConfigError as exc:
        return time.perf_counter() - started, str(exc)
    return time.perf_counter() - started, ""


@pytest.mark.timeout(120)  # the quadratic check took hours on this file
def test_duplicates_cost_no_more_than_distinct_rows(tmp_path: Path):
    """200,000 rows, 20,000 of them listed earlier, load in about the time 200,000 distinct ones
    do; the first duplicates are still named with the line of their first listing."""
    rows, dups = 200_000, 20_000
    first = 1729679758111249333
    distinct = "".join(f"{first + i},US\n" for i in range(rows))
    repeated = "".join(f"{first + i},US\n" for i in range(rows - dups))
    repeated += "".join(f"{first + i},US\n" for i in range(rows - 2 * dups, rows - dups))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    clean = _job(tmp_path / "a", "targets_file: targets.csv\n", "product_id,region\n" + distinct)
    dirty = _job(tmp_path / "b", "targets_file: targets.csv\n", "product_id,region\n" + repeated)
    # the best of two, on a machine shared with other work
    clean_seconds = min(_load_seconds(clean)[0] for _ in range(2))
    dirty_seconds, refused = min(_load_seconds(dirty) for _ in range(2))
    assert dirty_seconds < 2.5 * clean_seconds, (dirty_seconds, clean_seconds)
    lines = refused.splitlines()
    csv = tmp_path / "b" / "targets.csv"
    # the header is line 1: row i is on line i + 2
    assert lines[0] == (
        f"{csv}:{rows - dups + 2}: product {first + rows - 2 * dups} in US is already listed "
        f"at line {rows - 2 * dups + 2}"
    )
    assert lines[MAX_ERRORS - 1].endswith(f"at line {rows - 2 * dups + MAX_ERRORS + 1}")
    assert lines[MAX_ERRORS:] == [
        f"... and {dups - MAX_ERRORS:,} more bad targets ({dups:,} in all)"
    ]


def test_a_duplicate_of_an_id_kept_as_text_names_its_first_line(tmp_path: Path):
    """Ids a number cannot hold (leading zeros, over 64 bits) are checked exactly too."""
    long_id = "9" * 25
    text = f"product_id,region\n007,US\n{long_id},US\n7,US\n{long_id},GB\n007,US\n{long_id},US\n"
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    csv = tmp_path / "targets.csv"
    assert str(caught.value).splitlines() == [
        f"{csv}:6: product 007 in US is already listed at line 2",
        f"{csv}:7: product {long_id} in US is already listed at line 3",
    ]


def test_ids_alike_in_their_low_bits_are_different_targets(tmp_path: Path):
    """Two ids 2**60 apart are two products (a key of the id's low 60 bits and the region
    would take them for one)."""
    low = 576758253504402357
    text = f"product_id,region\n{low},US\n{low + 2**60},US\n"
    job = load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    assert [t.product_id for t in job.targets] == [str(low), str(low + 2**60)]


def test_a_cap_too_large_for_its_column_is_named(tmp_path: Path):
    """2**32 pages overflowed the cap column (a traceback); 5,000 digits overflowed int()."""
    huge = "9" * 5000
    text = (
        "product_id,region,max_pages\n"
        f"1729679758111249333,US,4294967296\n1729679758111249333,GB,{huge}\n"
        "1729679758111249333,DE,1000000\n1729679758111249333,FR,0007\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    csv = tmp_path / "targets.csv"
    assert str(caught.value).splitlines() == [
        f"{csv}:2: max_pages: '4294967296' is more than 1000000, the most it may be",
        f"{csv}:3: max_pages: '{huge[:60]}...' (5,000 characters) is more than 1000000, the "
        "most it may be",
    ]
    job = load_job(
        _job(
            tmp_path,
            "targets_file: targets.csv\n",
            text.replace("\n1729679758111249333,US,4294967296\n1729679758111249333,GB," + huge, ""),
        )
    )
    assert [t.max_pages for t in job.targets] == [1_000_000, 7]


def test_a_field_over_the_csv_limit_is_named(tmp_path: Path):
    """A cell of 200,000 characters was a csv.Error traceback."""
    text = (
        "product_id,region,title\n1729679758111249333,US,tea\n"
        f"1729679758111249334,US,{'x' * 200_000}\n1729679758111249335,US,tea\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    assert str(caught.value) == (
        f"{tmp_path / 'targets.csv'}:3: a field of more than 131,072 characters; the file is not "
        "read past it"
    )


def test_a_quote_left_open_names_where_it_opened(tmp_path: Path):
    rows = "".join(f"{1729679758111249340 + i},US,tea\n" for i in range(10_000))
    text = 'product_id,region,title\n1729679758111249333,US,"tea\n' + rows
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    message = str(caught.value)
    assert message.startswith(
        f"{tmp_path / 'targets.csv'}:2: a field of more than 131,072 characters (up to line "
    )
    assert message.endswith(": a quote left open?); the file is not read past it")


def test_a_long_bad_value_is_cut_short(tmp_path: Path):
    text = f"product_id,region\n{'x' * 100_000},US\n"
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    assert str(caught.value) == (
        f"{tmp_path / 'targets.csv'}:2: product_id: '{'x' * 60}...' (100,000 characters) is not "
        "a product id (a string of digits)"
    )


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs(tmp_path: Path, delimiter: str):
    """A spreadsheet in a locale whose decimal mark is a comma saves `;`; an export may use
    tabs: the header says which. Both were read as a list of ids, every row refused."""
    rows = [
        ["product_id", "region", "title", "max_pages"],
        ["1729679758111249333", "US", "tea, green", ""],
        ["1729679758111249333", "GB", "tea", "3"],
    ]
    text = "".join(delimiter.join(row) + "\n" for row in rows)
    job = load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    assert [(t.product_id, t.region, t.max_pages) for t in job.targets] == [
        ("1729679758111249333", "US", None),
        ("1729679758111249333", "GB", 3),
    ]


def test_a_quoted_header_separated_by_semicolons(tmp_path: Path):
    text = '"product_id";"region"\n"1729679758111249333";"US"\n'
    job = load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    assert [t.key for t in job.targets] == ["1729679758111249333:US"]


def test_a_list_of_ids_with_a_semicolon_says_what_a_csv_needs(tmp_path: Path):
    extra = "targets_file: ids.txt\ndefault_regions: [US]\n"
    with pytest.raises(ConfigError, match="a CSV needs a header row naming product_id"):
        load_job(_job(tmp_path, extra, "1729679758111249333;US\n", name="ids.txt"))


def test_a_region_mistaken_in_a_targets_file_gets_the_one_meant(tmp_path: Path):
    text = (
        "product_id,region\n1729679758111249333,UK\n1729679758111249333,us\n"
        "1729679758111249333,Phillipines\n1729679758111249333,DK\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_job(_job(tmp_path, "targets_file: targets.csv\n", text))
    csv = tmp_path / "targets.csv"
    assert str(caught.value).splitlines() == [
        f"{csv}:2: region: 'UK' is not a region: GB is the United Kingdom",
        f"{csv}:3: region: 'us' is not a region: write it US",
        f"{csv}:4: region: 'Phillipines' is not a region: PH is the Philippines",
        f"{csv}:5: region: unknown region 'DK'; one of US, GB, DE, FR, IT, ID, MY, MX, PH, SG, "
        "ES, TH, VN, BR, JP, IE",
    ]

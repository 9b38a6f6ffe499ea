"""Rules: loading, validation, matching, rendering and the loop check."""

from __future__ import annotations

import dataclasses
import unicodedata
from pathlib import Path

import pytest

from reactor.domain import OnConflict
from reactor.errors import ConfigError, RuleError
from reactor.rules import Match, Rule, RuleSet, load_rules, parse_rules

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "rules.toml"

ALERTS = """
[[rules]]
name = "alerts"
source_bucket = "images"
pattern = "{task_type}/{task_id}/{filename}"
target_bucket = "alerts"
target = "{task_type}/{task_id}/{filename}"
order_key = "{task_id}"
on_conflict = "overwrite"
"""


def toml_rule(**keys: str | int | None) -> str:
    """One [[rules]] table: the alerts rule with keys replaced (a None value drops the key)."""
    table: dict[str, str | int | None] = {
        "name": "alerts",
        "source_bucket": "images",
        "pattern": "{task_type}/{task_id}/{filename}",
        "target_bucket": "alerts",
        "target": "{task_type}/{task_id}/{filename}",
    }
    table.update(keys)
    lines = ["[[rules]]"]
    for key, value in table.items():
        if value is None:
            continue
        rendered = f'"{value}"' if isinstance(value, str) else str(value)
        lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


def make_rule(**keys: str) -> Rule:
    values = {
        "name": "r",
        "source_bucket": "inbox",
        "pattern": "{a}/{b}",
        "target_bucket": "outbox",
        "target": "{a}/{b}",
    }
    values.update(keys)
    return Rule(**values)  # type: ignore[arg-type]


def rule_error(text: str, source: str = "rules.toml") -> str:
    with pytest.raises(RuleError) as caught:
        parse_rules(text, source)
    return str(caught.value)


# --- loading -------------------------------------------------------------------------------------


def test_alerts_rule_loads_with_every_key() -> None:
    # Given the alerts rule from the brief
    # When it is parsed
    rules = parse_rules(ALERTS)
    # Then one rule carries every value as written
    (rule,) = rules.rules
    assert rule.name == "alerts"
    assert rule.source_bucket == "images"
    assert rule.pattern == "{task_type}/{task_id}/{filename}"
    assert rule.target_bucket == "alerts"
    assert rule.target == "{task_type}/{task_id}/{filename}"
    assert rule.order_key == "{task_id}"
    assert rule.on_conflict is OnConflict.OVERWRITE
    assert rule.prefix == ""


def test_optional_keys_default() -> None:
    # Given a rule without order_key and on_conflict
    rules = parse_rules(toml_rule())
    # Then order_key means "the source key" and conflicts overwrite
    (rule,) = rules.rules
    assert rule.order_key is None
    assert rule.on_conflict is OnConflict.OVERWRITE
    match = rules.match("images", "detect/7/a.jpg")
    assert match is not None
    assert match.order_key == "detect/7/a.jpg"


@pytest.mark.parametrize("value", [member.value for member in OnConflict])
def test_every_on_conflict_value_is_accepted(value: str) -> None:
    # Given each documented on_conflict value / When parsed / Then it becomes the enum member
    (rule,) = parse_rules(toml_rule(on_conflict=value)).rules
    assert rule.on_conflict is OnConflict(value)


def test_example_file_loads_and_routes_both_rules() -> None:
    # Given the shipped example
    # When it is loaded from disk
    rules = load_rules(EXAMPLES)
    # Then both rules are there, in file order, and each routes a realistic key
    assert [rule.name for rule in rules.rules] == ["alerts", "finished-uploads"]
    alert = rules.match("images", "detect/测试10/frame 001.jpg")
    assert alert is not None
    assert (alert.target_bucket, alert.target_key, alert.order_key) == (
        "alerts",
        "detect/测试10/frame 001.jpg",
        "测试10",
    )
    upload = rules.match("uploads", "incoming/42/raw/cam 1/f+1.jpg")
    assert upload is not None
    assert (upload.target_bucket, upload.target_key, upload.order_key) == (
        "uploads",
        "done/42/raw/cam 1/f+1.jpg",
        "42",
    )
    assert upload.rule.on_conflict is OnConflict.SKIP
    # And the moved object is not picked up again
    assert rules.match("uploads", upload.target_key) is None


def test_load_rules_reads_a_file(tmp_path: Path) -> None:
    # Given a rules file on disk, as str and as Path
    path = tmp_path / "rules.toml"
    path.write_text(ALERTS, encoding="utf-8")
    # When loaded either way / Then the same rules come back
    assert load_rules(path) == load_rules(str(path)) == parse_rules(ALERTS)


def test_load_rules_names_a_missing_file(tmp_path: Path) -> None:
    # Given a path that does not exist
    missing = tmp_path / "nope.toml"
    # When loaded / Then the error names the setting and the path and says what to do
    with pytest.raises(
        RuleError, match=r"REACTOR_RULES points at .*nope\.toml.* which does not exist"
    ) as caught:
        load_rules(missing)
    assert "set REACTOR_RULES" in str(caught.value)


def test_load_rules_names_an_unreadable_path(tmp_path: Path) -> None:
    # Given a directory where a file is expected
    # When loaded / Then RuleError (not IsADirectoryError) names the path
    with pytest.raises(RuleError, match="cannot read the rules file") as caught:
        load_rules(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_load_rules_refuses_non_utf8(tmp_path: Path) -> None:
    # Given a Latin-1 file
    path = tmp_path / "rules.toml"
    path.write_bytes(ALERTS.replace("alerts", "alérts").encode("latin-1"))
    # When loaded / Then the error names the file and asks for UTF-8
    with pytest.raises(RuleError, match=r"rules\.toml: not UTF-8 .*save the file as UTF-8"):
        load_rules(path)


def test_rule_error_is_a_config_error() -> None:
    # The CLI reports every ConfigError the same way, rules included.
    assert issubclass(RuleError, ConfigError)


# --- validation: every error names the file, the rule and the problem ---------------------------

BAD_FILES = [
    pytest.param(
        '[[rules]]\nname = "alerts"\nsource_bucket = images\n',
        ["rules.toml: not valid TOML", "line 3", "fix the syntax"],
        id="toml-syntax",
    ),
    pytest.param("", ["rules.toml: no [[rules]] tables", "add at least one"], id="empty-file"),
    pytest.param("rules = []\n", ["rules.toml: no [[rules]] tables"], id="empty-array"),
    pytest.param(
        toml_rule().replace("[[rules]]", "[[rule]]"),
        ["rules.toml: unknown top-level key(s) 'rule'", "[[rules]]"],
        id="typo-in-header",
    ),
    pytest.param(
        'title = "x"\n' + toml_rule(),
        ["unknown top-level key(s) 'title'"],
        id="stray-top-level-key",
    ),
    pytest.param(
        'rules = "x"\n', ["'rules' must be an array of tables", "got a string"], id="rules-not-array"
    ),
    pytest.param(
        toml_rule().replace("[[rules]]", "[rules]"),
        ["'rules' must be an array of tables", "got a table"],
        id="single-table",
    ),
    pytest.param("rules = [1]\n", ["rules[0]", "must be a table", "a number"], id="rules-of-numbers"),
    pytest.param(
        toml_rule() + toml_rule(target_bucket="other"),
        ["rule 'alerts' is defined twice (rules[0] and rules[1])", "unique name"],
        id="duplicate-name",
    ),
    pytest.param(
        toml_rule(targt="x"),
        ["rule 'alerts': unknown key 'targt'", "did you mean 'target'?", "fix the spelling"],
        id="unknown-key-typo",
    ),
    pytest.param(
        toml_rule(priority="1"),
        ["rule 'alerts': unknown key 'priority'", "the allowed keys are name, source_bucket"],
        id="unknown-key",
    ),
    pytest.param(
        toml_rule(target_bucket=None),
        ["rule 'alerts': missing required key(s) target_bucket", "add them"],
        id="missing-target-bucket",
    ),
    pytest.param(
        toml_rule(pattern=None, target=None),
        ["rule 'alerts': missing required key(s) pattern, target"],
        id="missing-two",
    ),
    pytest.param(
        toml_rule() + toml_rule(name=None),
        ["rules[1] (the [[rules]] table number 2): missing required key(s) name"],
        id="nameless-rule-by-index",
    ),
    pytest.param(
        toml_rule(name=""),
        ["rules[0] (the [[rules]] table number 1): name is empty"],
        id="empty-name",
    ),
    pytest.param(toml_rule(pattern=""), ["rule 'alerts': pattern is empty"], id="empty-pattern"),
    pytest.param(toml_rule(target=""), ["rule 'alerts': target is empty"], id="empty-target"),
    pytest.param(toml_rule(order_key=""), ["rule 'alerts': order_key is empty"], id="empty-order-key"),
    pytest.param(
        toml_rule(source_bucket=""), ["rule 'alerts': source_bucket is empty"], id="empty-source-bucket"
    ),
    pytest.param(
        toml_rule(pattern=3), ["rule 'alerts': pattern must be a string, got a number (3)"], id="int-value"
    ),
    pytest.param(
        toml_rule(on_conflict="replace"),
        ["rule 'alerts': on_conflict 'replace' is not one of overwrite, skip, fail"],
        id="bad-on-conflict",
    ),
    pytest.param(
        toml_rule(target="{task_type}/{taskid}/{filename}"),
        ["rule 'alerts': target", "uses field {taskid}", "does not define", "{task_id}"],
        id="unknown-field-in-target",
    ),
    pytest.param(
        toml_rule(order_key="{task}"),
        ["rule 'alerts': order_key '{task}' uses field {task}", "use one of the pattern's fields"],
        id="unknown-field-in-order-key",
    ),
    pytest.param(
        toml_rule(pattern="{task_id}/{name}/{name}", target="{name}"),
        ["rule 'alerts': pattern", "uses field {name} more than once"],
        id="duplicate-field",
    ),
    pytest.param(
        toml_rule(pattern="{a}{b}", target="{a}"),
        ["rule 'alerts': pattern '{a}{b}' has fields {a} and {b} side by side", "put literal text"],
        id="adjacent-fields",
    ),
    pytest.param(
        toml_rule(pattern="{1st}/x", target="y"),
        ["rule 'alerts': pattern", "'{1st}', which is not a field", "Python identifier"],
        id="field-not-identifier",
    ),
    pytest.param(
        toml_rule(pattern="{}/x", target="y"), ["'{}', which is not a field"], id="empty-field-name"
    ),
    pytest.param(
        toml_rule(pattern="{a:int}/x", target="{a}"),
        ["rule 'alerts': pattern", "unknown modifier 'int'", "':path'"],
        id="unknown-modifier",
    ),
    pytest.param(
        toml_rule(pattern="{a/x", target="y"),
        ["rule 'alerts': pattern '{a/x' has an unclosed '{' at position 0", "'{{'"],
        id="unclosed-brace",
    ),
    pytest.param(
        toml_rule(pattern="a}/{b}", target="{b}"),
        ["rule 'alerts': pattern 'a}/{b}' has an unmatched '}' at position 1", "'}}'"],
        id="stray-closing-brace",
    ),
    pytest.param(
        toml_rule(pattern="{a}/{b:path}", target="{a}/{b:path}"),
        ["rule 'alerts': target", "':path' belongs in the pattern only", "write '{b}'"],
        id="path-modifier-in-target",
    ),
    pytest.param(
        toml_rule(target="/{task_id}/{filename}"),
        ["rule 'alerts': target '/{task_id}/{filename}' starts with '/'", "fix the target"],
        id="target-absolute",
    ),
    pytest.param(
        toml_rule(target="{task_id}//{filename}"),
        ["rule 'alerts': target '{task_id}//{filename}' has an empty segment"],
        id="target-double-slash",
    ),
    pytest.param(toml_rule(target="{task_id}/{filename}/"), ["ends with '/'"], id="target-trailing-slash"),
    pytest.param(toml_rule(target="{task_id}/../{filename}"), ["has a '..' segment"], id="target-dotdot"),
    pytest.param(toml_rule(target="./{filename}"), ["has a '.' segment"], id="target-dot"),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
def test_invalid_rules_are_refused_with_a_message_that_says_where_and_what(
    text: str, fragments: list[str]
) -> None:
    # Given an invalid rules file
    # When it is parsed
    message = rule_error(text)
    # Then RuleError names the file, the rule and the problem
    assert message.startswith("rules.toml: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    "bucket",
    [
        "Images",
        "ab",
        "a" * 64,
        "-images",
        "images-",
        ".images",
        "im_ages",
        "im ages",
        "imáges",
        "im..ages",
        "im.-ages",
        "192.168.1.10",
    ],
)
@pytest.mark.parametrize("key", ["source_bucket", "target_bucket"])
def test_invalid_bucket_names_are_refused(key: str, bucket: str) -> None:
    # Given a bucket name S3 would refuse / When parsed / Then the rule names the key and the bucket
    message = rule_error(toml_rule(**{key: bucket}))
    assert f"rule 'alerts': {key} {bucket!r} is not a valid bucket name" in message


@pytest.mark.parametrize("bucket", ["abc", "a" * 63, "my-bucket.v2", "0images9", "1.2.3"])
def test_valid_bucket_names_are_accepted(bucket: str) -> None:
    (rule,) = parse_rules(toml_rule(source_bucket=bucket)).rules
    assert rule.source_bucket == bucket


def test_error_message_names_the_source_given() -> None:
    # Given a custom source label / Then errors name it, and the default label is <rules>
    assert rule_error("", "/etc/reactor/rules.toml").startswith("/etc/reactor/rules.toml: ")
    with pytest.raises(RuleError, match=r"^<rules>: "):
        parse_rules("")


def test_constructing_an_invalid_rule_directly_raises_rule_error() -> None:
    # Given code that builds a Rule itself / When a field is invalid / Then the same checks apply
    with pytest.raises(RuleError, match=r"^rule 'r': target '\{a\}/\{nope\}' uses field \{nope\}"):
        make_rule(target="{a}/{nope}")


# --- loops ---------------------------------------------------------------------------------------

OVERLAPS = [
    # (pattern giving the target's fields, target, pattern on the target bucket, overlaps)
    pytest.param("new/{f}", "done/{f}", "{a}/{b}", True, id="one-segment-vs-any-two"),
    pytest.param("new/{f}", "done/{f}", "new/{a}", False, id="different-literal-prefix"),
    pytest.param("in/{t}/{n}", "{t}/x.jpg", "{a}/{b}.png", False, id="different-suffix"),
    pytest.param("in/{t:path}", "{t}/x.jpg", "{a}/{b}/{c}.jpg", True, id="path-field-spans-segments"),
    pytest.param("in/{t}", "{t}/x.jpg", "{a}/{b}/{c}.jpg", False, id="plain-field-is-one-segment"),
    pytest.param("in/{p:path}", "archive/{p}", "archive/{a}", True, id="path-can-be-one-segment"),
    pytest.param("in/{p:path}", "archive/{p}", "archive/{a}/{b}/{c}/{d}", True, id="path-can-be-four"),
    pytest.param("in/{f}", "x-{f}", "x{a}", True, id="field-absorbs-literal"),
    pytest.param("in/{f}", "{f}.done", "{a}.jpg", False, id="suffix-differs"),
    pytest.param("in/{f}", "{f}.jpg.done", "{a}.done", True, id="suffix-after-dot"),
    pytest.param("in/{f}", "done/{f}", "done", False, id="field-is-never-empty"),
    pytest.param("in/{f}", "done/{f}", "done/{a:path}", True, id="path-pattern"),
    pytest.param("in/{f}", "fixed.jpg", "fixed.jpg", True, id="literal-equal"),
    pytest.param("in/{f}", "fixed.jpg", "{a}.jpg", True, id="literal-vs-field"),
    pytest.param("in/{f}", "fixed.jpg", "{a}/{b}", False, id="literal-has-no-slash"),
    pytest.param("img-{f}.jpg", "out/{f}", "out/{a}.png", True, id="embedded-field-is-any-chars"),
    pytest.param("in/{f}", "测试/{f}", "测{a}/{b}", True, id="unicode-literal-overlap"),
    pytest.param("in/{f}", "测试/{f}", "测验/{a}", False, id="unicode-literal-differs"),
    pytest.param("in/{f}", "a/{f}", "{a}/{b}/{c}", False, id="segment-count-differs"),
    pytest.param("in/{f:path}", "a/{f}", "{a}/{b}/{c}", True, id="path-adds-segments"),
    pytest.param("in/{f}", "{{x}}/{f}", "{{{a}}}/{b}", True, id="literal-braces"),
]


@pytest.mark.parametrize(("source_pattern", "target", "other_pattern", "overlaps"), OVERLAPS)
def test_loop_check_decides_overlap_exactly(
    source_pattern: str, target: str, other_pattern: str, overlaps: bool
) -> None:
    # Given a rule moving into bucket "outbox" and another rule reading from "outbox"
    text = toml_rule(
        name="first", source_bucket="inbox", pattern=source_pattern, target_bucket="outbox", target=target
    ) + toml_rule(
        name="second", source_bucket="outbox", pattern=other_pattern, target_bucket="done", target="x"
    )
    # When the file is parsed
    # Then it is refused exactly when the first rule's target can match the second rule's pattern
    if overlaps:
        message = rule_error(text)
        assert "rule 'first': target" in message
        assert "the pattern of rule 'second'" in message
        assert "would be taken by a rule again" in message
    else:
        rules = parse_rules(text)
        assert [rule.name for rule in rules.rules] == ["first", "second"]


def test_loop_message_shows_a_key_that_would_loop() -> None:
    # Given a rule whose target lands back under its own pattern in its own bucket
    message = rule_error(
        toml_rule(source_bucket="images", pattern="{a}/{b}", target_bucket="images", target="done/{b}")
    )
    # Then the message says it is its own pattern and gives a concrete key that both produce
    assert "rule 'alerts': target 'done/{b}' in bucket 'images'" in message
    assert "its own pattern ('{a}/{b}')" in message
    example = message.split("e.g. ")[1].split(",")[0].strip("'")
    rule = make_rule(pattern="{a}/{b}")
    assert example.startswith("done/")
    assert rule.match(example) is not None


def test_same_bucket_move_without_overlap_is_allowed() -> None:
    # Given a move within one bucket whose target cannot match its pattern
    rules = parse_rules(
        toml_rule(source_bucket="uploads", pattern="new/{f:path}", target_bucket="uploads", target="done/{f}")
    )
    # When a moved key is seen again / Then no rule takes it
    assert rules.match("uploads", "done/a/b.jpg") is None
    assert rules.match("uploads", "new/a/b.jpg") is not None


def test_loop_through_a_rule_on_another_bucket_is_checked_in_both_directions() -> None:
    # Given a ping-pong between two buckets
    text = toml_rule(
        name="ping", source_bucket="left", pattern="{a}", target_bucket="right", target="{a}"
    ) + toml_rule(name="pong", source_bucket="right", pattern="{a}", target_bucket="left", target="{a}")
    # Then the first rule that feeds the other is reported
    assert "rule 'ping': target '{a}' in bucket 'right'" in rule_error(text)


def test_a_chain_of_rules_is_refused_because_own_writes_are_ignored() -> None:
    # Given rules that chain (aaa -> bbb, then bbb -> ccc)
    text = toml_rule(
        name="one", source_bucket="aaa", pattern="{a}", target_bucket="bbb", target="stage/{a}"
    ) + toml_rule(name="two", source_bucket="bbb", pattern="stage/{a}", target_bucket="ccc", target="{a}")
    # When parsed
    message = rule_error(text)
    # Then it is refused: the second rule would never see the reactor's own writes
    assert "rule 'one': target 'stage/{a}' in bucket 'bbb'" in message
    assert "the pattern of rule 'two'" in message
    assert "ignores its own writes" in message


# --- matching ------------------------------------------------------------------------------------

NFC = unicodedata.normalize("NFC", "café")
NFD = unicodedata.normalize("NFD", "café")

MATCHES = [
    ("{a}/{b}", "x/y", {"a": "x", "b": "y"}),
    ("{a}/{b}", "x/y/z", None),
    ("{a}/{b}", "x/", None),
    ("{a}/{b}", "/y", None),
    ("{a}/{b}", "x", None),
    ("{name}.jpg", "cat.jpg", {"name": "cat"}),
    ("{name}.jpg", "cat.tar.jpg", {"name": "cat.tar"}),
    ("{name}.jpg", "cat.png", None),
    ("{name}.jpg", ".jpg", None),
    ("{name}.jpg", "dir/cat.jpg", None),
    ("img-{n}.jpg", "img-7.jpg", {"n": "7"}),
    ("in/{p:path}", "in/a", {"p": "a"}),
    ("in/{p:path}", "in/a/b/c.jpg", {"p": "a/b/c.jpg"}),
    ("in/{p:path}", "in/", None),
    ("in/{p:path}", "in/a//b", None),
    ("in/{p:path}", "in/a/", None),
    ("in/{p:path}", "other/a", None),
    ("{p:path}/{name}.jpg", "a/b/c.jpg", {"p": "a/b", "name": "c"}),
    ("{t}/{f:path}", "测试10/深/x y+%41.jpg", {"t": "测试10", "f": "深/x y+%41.jpg"}),
    ("{task_type}/{task_id}/{filename}", "detect/测试10/sub/frame 001.jpg", None),
    ("{a}/{b}", "task 1/a+b%2Fc.jpg", {"a": "task 1", "b": "a+b%2Fc.jpg"}),
    ("a.b/{x}", "aXb/y", None),
    ("a.b/{x}", "a.b/y", {"x": "y"}),
    ("(x)+[y]*/{f}", "(x)+[y]*/1", {"f": "1"}),
    ("(x)+[y]*/{f}", "xx[y]/1", None),
    ("{{lit}}/{f}", "{lit}/1", {"f": "1"}),
    ("{a}/{b}", "x\ny/z", {"a": "x\ny", "b": "z"}),
    (f"{NFC}/{{f}}", f"{NFC}/1", {"f": "1"}),
    (f"{NFC}/{{f}}", f"{NFD}/1", None),
    ("{a}/{f}", f"{NFD}/1", {"a": NFD, "f": "1"}),
    ("exact/key.jpg", "exact/key.jpg", {}),
    ("exact/key.jpg", "exact/key.jpgx", None),
]


@pytest.mark.parametrize(("pattern", "key", "expected"), MATCHES)
def test_pattern_matches_the_whole_raw_key(pattern: str, key: str, expected: dict[str, str] | None) -> None:
    # Given a pattern / When matched against a key / Then fields come back verbatim, or None
    rule = make_rule(pattern=pattern, target="x" if not expected else "t/{" + next(iter(expected)) + "}")
    assert rule.match(key) == expected


def test_nfc_and_nfd_keys_stay_different_end_to_end() -> None:
    # Given the same-looking name in NFC and NFD
    assert NFC != NFD
    rules = parse_rules(toml_rule(pattern="{task_id}/{filename}", target="{task_id}/{filename}"))
    # When each is matched
    nfc = rules.match("images", f"{NFC}/1.jpg")
    nfd = rules.match("images", f"{NFD}/1.jpg")
    # Then each target keeps its own form: nothing is normalised
    assert nfc is not None
    assert nfd is not None
    assert nfc.target_key == f"{NFC}/1.jpg"
    assert nfd.target_key == f"{NFD}/1.jpg"
    assert nfc.target_key != nfd.target_key


@pytest.mark.parametrize(
    ("key", "target_key", "order_key"),
    [
        ("detect/7/a.jpg", "detect/7/a.jpg", "7"),
        ("detect/测试10/frame 001.jpg", "detect/测试10/frame 001.jpg", "测试10"),
        ("a b/c+d/e%41f.jpg", "a b/c+d/e%41f.jpg", "c+d"),
    ],
)
def test_rule_set_match_renders_target_and_order_key(key: str, target_key: str, order_key: str) -> None:
    # Given the alerts rule
    rules = parse_rules(ALERTS)
    # When an upload's key matches
    match = rules.match("images", key)
    # Then the target and order key are rendered verbatim
    assert match == Match(
        rule=rules.rules[0],
        order_key=order_key,
        target_bucket="alerts",
        target_key=target_key,
        target_error=None,
    )


def test_path_values_keep_their_slashes_in_target_and_order_key() -> None:
    # Given a deep-path rule whose order key is the whole sub-path
    rules = parse_rules(
        toml_rule(pattern="in/{task}/{filename:path}", target="out/{task}/{filename}", order_key="{filename}")
    )
    # When a deep key matches
    match = rules.match("images", "in/测试10/a/b c/d+e.jpg")
    # Then slashes of the path field survive in both templates
    assert match is not None
    assert match.target_key == "out/测试10/a/b c/d+e.jpg"
    assert match.order_key == "a/b c/d+e.jpg"


def test_first_rule_in_file_order_wins() -> None:
    # Given two rules on one bucket where both match "special/x"
    rules = parse_rules(
        toml_rule(name="special", pattern="special/{f}", target="s/{f}")
        + toml_rule(name="general", pattern="{d}/{f}", target="g/{d}/{f}")
    )
    # When matched / Then the earlier rule wins, and the later one takes the rest
    first = rules.match("images", "special/x")
    other = rules.match("images", "plain/x")
    assert first is not None
    assert first.rule.name == "special"
    assert other is not None
    assert other.rule.name == "general"


def test_no_match_on_other_bucket_or_key() -> None:
    rules = parse_rules(ALERTS)
    # Given a key that fits the pattern but lives in another bucket / Then no match
    assert rules.match("alerts", "detect/7/a.jpg") is None
    # Given a key with the wrong depth / Then no match
    assert rules.match("images", "detect/7/sub/a.jpg") is None
    assert rules.match("images", "") is None


@pytest.mark.parametrize(
    ("key", "target_key", "problem"),
    [
        ("a/../b", "out/a/../b", "has a '..' segment"),
        ("../etc", "out/../etc", "has a '..' segment"),
        ("a/./b", "out/a/./b", "has a '.' segment"),
        ("./x", "out/./x", "has a '.' segment"),
    ],
)
def test_unsafe_rendered_target_is_reported_not_raised(key: str, target_key: str, problem: str) -> None:
    # Given a rule whose path field can carry dot segments
    rules = parse_rules(toml_rule(name="alerts", pattern="{p:path}", target="out/{p}"))
    # When such a key matches
    match = rules.match("images", key)
    # Then the match carries an error naming the rule, the target, the key and the problem
    assert match is not None
    assert match.target_key == target_key
    assert match.target_error is not None
    assert match.target_error.startswith(f"rule 'alerts': target {target_key!r} for key {key!r} {problem}")
    assert "fix the key or the rule" in match.target_error


def test_dot_dot_target_error_message_is_exact() -> None:
    rules = parse_rules(toml_rule(pattern="{p:path}", target="{p}"))
    match = rules.match("images", "a/../b")
    assert match is not None
    assert match.target_error == (
        "rule 'alerts': target 'a/../b' for key 'a/../b' has a '..' segment; "
        "a target is never written outside its path: fix the key or the rule"
    )


@pytest.mark.parametrize("key", ["a..b/c", "..a/b", "a/.hidden", "a/b..", "x/...", "x/ /y"])
def test_dots_inside_a_segment_are_safe(key: str) -> None:
    # Given names that contain dots (or spaces) but are not '.'/'..' segments / Then no target error
    match = parse_rules(toml_rule(pattern="{p:path}", target="out/{p}")).match("images", key)
    assert match is not None
    assert match.target_error is None


# --- prefixes and buckets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["in/{a}", "in/sub/{b}", "other/{c}"], ("in/", "other/")),
        (["{a}/x", "in/{b}"], ("",)),
        (["in/{a}", "in/{b}"], ("in/",)),
        (["in{a}", "in/{b}"], ("in",)),
        (["b/{a}", "a/{b}", "ab/{c}"], ("a/", "ab/", "b/")),
        (["{{x}}/{a}"], ("{x}/",)),
        (["exact/key.jpg"], ("exact/key.jpg",)),
        (["测试/{a}", "测/{b}"], ("测/", "测试/")),
    ],
)
def test_prefixes_are_minimal_and_sorted(patterns: list[str], expected: tuple[str, ...]) -> None:
    # Given several rules on one bucket and one on another
    text = "".join(
        toml_rule(name=f"r{i}", pattern=pattern, target=f"t{i}/x") for i, pattern in enumerate(patterns)
    ) + toml_rule(name="elsewhere", source_bucket="other", pattern="zzz/{a}", target="x")
    rules = parse_rules(text)
    # When asked for the bucket's prefixes / Then only the bucket's rules count, and none is covered twice
    assert rules.prefixes("images") == expected
    assert rules.prefixes("other") == ("zzz/",)
    assert rules.prefixes("unknown") == ()


def test_rule_prefix_is_literal_text_before_the_first_field() -> None:
    assert make_rule(pattern="in/{a}/{b}").prefix == "in/"
    assert make_rule(pattern="{a}/{b}").prefix == ""
    assert make_rule(pattern="img-{a}/{b}").prefix == "img-"


def test_buckets() -> None:
    # Given the example rules
    rules = load_rules(EXAMPLES)
    # Then sources and every named bucket are reported
    assert rules.source_buckets == frozenset({"images", "uploads"})
    assert rules.buckets == frozenset({"images", "uploads", "alerts"})


# --- records -------------------------------------------------------------------------------------


def test_rules_are_frozen_and_compare_by_their_declared_fields() -> None:
    # Given the same rule parsed twice
    first = parse_rules(ALERTS)
    second = parse_rules(ALERTS)
    # Then the sets are equal and hashable, and a rule cannot be changed
    assert first == second
    assert hash(first.rules[0]) == hash(second.rules[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.rules[0].name = "other"  # type: ignore[misc]


def test_rule_repr_shows_no_compiled_state() -> None:
    text = repr(parse_rules(ALERTS).rules[0])
    assert "re.compile" not in text
    assert "_tokens" not in text


def test_rule_set_built_in_code_runs_the_same_set_checks() -> None:
    # Given rules built directly that loop / When put in a RuleSet / Then the loop is refused
    looping = make_rule(source_bucket="same", target_bucket="same", pattern="{a}", target="{a}")
    with pytest.raises(RuleError, match="would be taken by a rule again"):
        RuleSet(rules=(looping,))
    # And a list is accepted and kept as a tuple
    assert RuleSet(rules=[make_rule()]).rules == (make_rule(),)  # type: ignore[arg-type]


def test_replace_recompiles_the_rule() -> None:
    # Given a rule / When a field is replaced / Then matching follows the new pattern
    rule = parse_rules(ALERTS).rules[0]
    moved = dataclasses.replace(rule, pattern="new/{task_type}/{task_id}/{filename}")
    assert moved.prefix == "new/"
    assert moved.match("new/a/b/c.jpg") == {"task_type": "a", "task_id": "b", "filename": "c.jpg"}
    assert moved.match("a/b/c.jpg") is None

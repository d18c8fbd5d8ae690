//! The gate's outcome for CI: JUnit XML (one test suite per scenario, one test case per check)
//! and a Markdown summary (the table a pull-request comment carries).

use std::fmt::Write as _;

use super::{CheckKind, ScenarioGate, Status};

/// Escapes text for XML content and attribute values; drops characters XML 1.0 cannot carry.
fn xml_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            '\t' | '\n' | '\r' => escaped.push(character),
            control if (control as u32) < 0x20 => {}
            other => escaped.push(other),
        }
    }
    escaped
}

/// The gate's outcome as JUnit XML.
pub fn junit_xml(gates: &[ScenarioGate]) -> String {
    let tests: usize = gates.iter().map(|gate| gate.checks.len()).sum();
    let failures: usize =
        gates.iter().flat_map(|gate| &gate.checks).filter(|check| check.status == Status::Fail).count();
    let mut xml = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(xml, "<testsuites name=\"tcore gate\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\">");
    for gate in gates {
        let suite_failures = gate.checks.iter().filter(|check| check.status == Status::Fail).count();
        let _ = writeln!(
            xml,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{suite_failures}\" errors=\"0\" skipped=\"0\">",
            xml_escape(&gate.scenario),
            gate.checks.len()
        );
        let _ = writeln!(
            xml,
            "    <properties><property name=\"run_result\" value=\"{}\"/></properties>",
            xml_escape(&gate.run_file)
        );
        for check in &gate.checks {
            let _ = write!(
                xml,
                "    <testcase classname=\"tcore.gate.{}.{}\" name=\"{}\" time=\"0\">",
                xml_escape(&gate.scenario),
                check.kind.name(),
                xml_escape(&check.name)
            );
            match check.status {
                Status::Fail => {
                    let _ = write!(
                        xml,
                        "<failure message=\"{}\" type=\"{}\">{}</failure>",
                        xml_escape(&check.message),
                        check.kind.name(),
                        xml_escape(&check.message)
                    );
                }
                Status::Warn => {
                    let _ = write!(xml, "<system-out>warning: {}</system-out>", xml_escape(&check.message));
                }
                Status::Pass => {}
            }
            xml.push_str("</testcase>\n");
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    xml
}

/// Escapes text for a Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn tally(gate: &ScenarioGate, kind: CheckKind) -> String {
    let total = gate.checks.iter().filter(|check| check.kind == kind).count();
    if total == 0 {
        return "–".to_owned();
    }
    let passed = total - gate.count(kind, Status::Fail);
    format!("{passed}/{total}")
}

/// The gate's outcome as Markdown: a summary table, the failures, and what moved against the
/// baselines.
pub fn markdown(gates: &[ScenarioGate]) -> String {
    let failed = gates.iter().filter(|gate| !gate.passed()).count();
    let mut text = format!(
        "## tcore gate: {} {}, {} passed, {failed} failed\n\n",
        gates.len(),
        if gates.len() == 1 { "scenario" } else { "scenarios" },
        gates.len() - failed
    );
    text.push_str(
        "| scenario | verdict | safety | SLOs | baseline | changed |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for gate in gates {
        let changed =
            gate.checks.iter().filter(|check| check.kind == CheckKind::Baseline && check.change.is_some()).count();
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {changed} |",
            cell(&gate.scenario),
            if gate.passed() { "✅ pass" } else { "❌ **fail**" },
            tally(gate, CheckKind::Safety),
            tally(gate, CheckKind::Slo),
            tally(gate, CheckKind::Baseline)
        );
    }
    let failures: Vec<String> = gates
        .iter()
        .flat_map(|gate| {
            gate.checks.iter().filter(|check| check.status == Status::Fail).map(move |check| {
                format!(
                    "- **{}** {} `{}`: {}\n",
                    cell(&gate.scenario),
                    check.kind.name(),
                    check.name,
                    cell(&check.message)
                )
            })
        })
        .collect();
    if !failures.is_empty() {
        text.push_str("\n### Failures\n\n");
        text.extend(failures);
    }
    let changes: Vec<String> = gates
        .iter()
        .flat_map(|gate| {
            // Wall-clock figures always move a little; they are listed only when they warn.
            let listed = |check: &&super::Check| {
                check.change.is_some() && (check.kind != CheckKind::Wall || check.status != Status::Pass)
            };
            gate.checks.iter().filter(listed).map(move |check| {
                let mark = match check.status {
                    Status::Pass => "ok",
                    Status::Warn => "warn",
                    Status::Fail => "**fail**",
                };
                format!("| {} | `{}` | {} | {mark} |\n", cell(&gate.scenario), check.name, cell(&check.message))
            })
        })
        .collect();
    if !changes.is_empty() {
        text.push_str("\n### Changes against the baselines\n\n| scenario | metric | change | verdict |\n| --- | --- | --- | --- |\n");
        text.extend(changes);
        text.push_str("\nAn improvement beyond the tolerance is recorded with `tcore gate --update-baseline`.\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escape_covers_markup_and_control_characters() {
        assert_eq!(xml_escape("a<b & \"c\" 'd'\u{1}"), "a&lt;b &amp; &quot;c&quot; &apos;d&apos;");
    }
}

//! The Helm chart (charts/keyward) agrees with the crate: appVersion is the crate version, the
//! image's build command is the one CI runs, and the alerts the chart ships are the tested file.
//! Rendering, installing and RBAC are tested on the plane by e2e/install.sh.

use std::path::Path;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The value of a top-level `key: value` line of a YAML file.
fn top_level(yaml: &str, key: &str) -> Option<String> {
    yaml.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().trim_matches('"').to_string())
}

#[test]
fn app_version_is_the_crate_version() {
    let chart = read("charts/keyward/Chart.yaml");
    assert_eq!(
        top_level(&chart, "appVersion").as_deref(),
        Some(env!("CARGO_PKG_VERSION")),
        "charts/keyward/Chart.yaml appVersion must be the crate version in Cargo.toml"
    );
    assert_eq!(top_level(&chart, "name").as_deref(), Some("keyward"));
}

#[test]
fn image_tag_defaults_to_app_version() {
    let values = read("charts/keyward/values.yaml");
    assert!(
        values.contains("\n  tag: \"\"\n"),
        "image.tag must default to empty (appVersion)"
    );
    let helpers = read("charts/keyward/templates/_helpers.tpl");
    assert!(helpers.contains("(default .Chart.AppVersion .Values.image.tag)"));
}

#[test]
fn dockerfile_has_one_marked_single_line_build_command() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().collect();
    let markers: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == "# keyward:build-command")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(markers.len(), 1, "one `# keyward:build-command` marker");
    let command = lines[markers[0] + 1];
    assert!(
        command.starts_with("RUN cargo build --release --locked"),
        "{command}"
    );
    assert!(
        !command.ends_with('\\'),
        "the build command stays on one line"
    );
    assert!(dockerfile.contains("USER 65532:65532"), "non-root user");
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/keyward\", \"run\"]"));
}

#[test]
fn prometheus_rule_embeds_the_tested_rules_file() {
    let template = read("charts/keyward/templates/prometheusrule.yaml");
    assert!(template.contains(r#"{{- .Files.Get "files/keyward-rules.yaml" | nindent 2 }}"#));
    let test = read("e2e/alerts.test.yaml");
    assert!(test.contains("  - ../charts/keyward/files/keyward-rules.yaml\n"));
    // Every alert has a unit test and a runbook section.
    let rules = read("charts/keyward/files/keyward-rules.yaml");
    let runbook = read("docs/alerts.md");
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            test.contains(&format!("alertname: {alert}\n")),
            "{alert} has no promtool test"
        );
        assert!(
            runbook.contains(&format!("## {alert}\n")),
            "{alert} has no section in docs/alerts.md"
        );
    }
}

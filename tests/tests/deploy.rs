//! The systemd units in deploy/systemd parse and reference what they should.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use baton_tests::harness::repo_root;

#[test]
fn systemd_units_verify() {
    let dir = repo_root().join("deploy/systemd");
    let units: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(units.len(), 4, "{units:?}");
    for u in &units {
        let text = std::fs::read_to_string(u).unwrap();
        if u.extension().is_some_and(|e| e == "service") {
            assert!(text.contains("Restart=always"), "{}", u.display());
            assert!(text.contains("StartLimitIntervalSec=0"), "{}", u.display());
            assert!(text.contains("Type=notify"), "{}", u.display());
            assert!(text.contains("NoNewPrivileges=yes"), "{}", u.display());
        }
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        baton_tests::harness::cannot_run("systemd", "systemd-analyze not installed");
        return;
    }
    for u in &units {
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(u)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        // The binaries are not installed on a test machine; anything else is a unit error.
        let problems: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("is not executable"))
            .collect();
        assert!(problems.is_empty(), "{}: {problems:?}", u.display());
    }
}

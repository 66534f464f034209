//! The systemd units in deploy/systemd parse and reference what they should.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use baton_tests::harness::repo_root;

/// The value of `key=` in a unit (its only line for that key).
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut found = text
        .lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='));
    let v = found.next();
    assert!(found.next().is_none(), "{key}= is set twice");
    v
}

#[test]
fn sysusers_creates_the_services_user() {
    let text = std::fs::read_to_string(repo_root().join("deploy/sysusers.d/baton.conf")).unwrap();
    assert!(text.lines().any(|l| l.starts_with("u baton ")), "{text}");
}

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
            // Least privilege: a fixed unprivileged user, no capability, a read-only system,
            // bounded memory and tasks, UNIX sockets only.
            for setting in [
                "User=baton",
                "Group=baton",
                "ProtectSystem=strict",
                "ProtectHome=yes",
                "PrivateTmp=yes",
                "ProtectKernelTunables=yes",
                "ProtectKernelModules=yes",
                "ProtectControlGroups=yes",
                "LockPersonality=yes",
                "MemoryDenyWriteExecute=yes",
                "RestrictNamespaces=yes",
                "RestrictSUIDSGID=yes",
                "RestrictAddressFamilies=AF_UNIX\n",
            ] {
                assert!(text.contains(setting), "{}: no {setting}", u.display());
            }
            assert_eq!(
                setting(&text, "CapabilityBoundingSet"),
                Some(""),
                "{}",
                u.display()
            );
            assert_eq!(
                setting(&text, "AmbientCapabilities"),
                Some(""),
                "{}",
                u.display()
            );
            assert_eq!(setting(&text, "DynamicUser"), None, "{}", u.display());
            let mem = setting(&text, "MemoryMax").unwrap();
            assert!(
                mem.ends_with('M') && mem[..mem.len() - 1].parse::<u32>().is_ok(),
                "{mem}"
            );
            let tasks: u32 = setting(&text, "TasksMax").unwrap().parse().unwrap();
            // At least main + 64 queue threads + signals + a front-end's thread.
            assert!(
                (67..=4096).contains(&tasks),
                "{}: TasksMax={tasks}",
                u.display()
            );
            if u.to_string_lossy().contains("baton-blk@") {
                assert_eq!(setting(&text, "ReadWritePaths"), Some("/var/lib/baton"));
                assert!(text.contains("PrivateNetwork=yes"));
            } else {
                // The TAP is made as root ("+"), owned by the service's user.
                let pre = setting(&text, "ExecStartPre").unwrap();
                assert!(pre.starts_with("-+/usr/sbin/ip tuntap add "), "{pre}");
                assert!(pre.ends_with(" user baton group baton"), "{pre}");
                assert!(text.contains("DevicePolicy=closed"));
                assert!(text.contains("DeviceAllow=/dev/net/tun rw"));
                assert!(text.contains("FileDescriptorStoreMax=64"));
            }
        } else {
            assert_eq!(
                setting(&text, "SocketMode"),
                Some("0600"),
                "{}",
                u.display()
            );
            assert_eq!(
                setting(&text, "SocketUser"),
                Some("baton"),
                "{}",
                u.display()
            );
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

//! The ACPI tables baton-vmm builds disassemble cleanly with ACPICA's `iasl -d`.

use std::process::Command;

#[test]
fn tables_disassemble_with_iasl() {
    if Command::new("iasl").arg("-v").output().is_err() {
        // ./test.sh installs acpica-tools; without it this test cannot say anything.
        eprintln!(
            "SKIP tables_disassemble_with_iasl: iasl not installed (apt-get install acpica-tools)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("baton-iasl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (sig, bytes) in baton_vmm::acpi::tables_for_inspection(4) {
        let file = dir.join(format!("{sig}.dat"));
        std::fs::write(&file, &bytes).unwrap();
        let out = Command::new("iasl")
            .arg("-d")
            .arg(&file)
            .current_dir(&dir)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "iasl -d {sig} failed:\n{text}");
        let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).unwrap();
        assert!(!text.contains("Error"), "{sig}: {text}");
        match sig.as_str() {
            "APIC" => assert_eq!(
                dsl.matches("Subtable Type : 00 [Processor Local APIC]")
                    .count(),
                4,
                "{dsl}"
            ),
            "FACP" => assert!(dsl.contains("Hardware Reduced (V5) : 1"), "{dsl}"),
            "DSDT" => {
                assert!(dsl.contains("_S5"), "{dsl}");
                assert!(dsl.contains("ACPI0007"), "{dsl}");
                assert!(dsl.contains("PNP0501"), "{dsl}");
                assert!(dsl.contains("PNP0A08"), "{dsl}");
            }
            "MCFG" => {
                assert!(dsl.contains("Base Address : 00000000E0000000"), "{dsl}");
            }
            _ => {}
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

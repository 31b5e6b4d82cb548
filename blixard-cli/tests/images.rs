//! Safe VM inputs through the CLI: `vm create --kernel/--initrd` take a
//! file name in the node's image directory (`--image-dir`), never a host
//! path. Host paths and `..` are refused at the API edge, with the rule
//! and exit code 1, and nothing is created. One real node process on
//! loopback; VMs are records only (`--vm-backend none`). What the node that
//! boots a VM does with a name (symlinks out of the directory, missing
//! files) is end to end in `vms.rs` (real QEMU) and unit-tested in
//! blixard-vm's `image_dir`.
mod common;

use common::*;
use serde_json::Value;

const RULE: &str = "a file name in the node's image directory (--image-dir)";

#[test]
fn host_paths_are_refused_at_the_edge_and_nothing_is_created() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node-1");
    let images = root.path().join("images");
    let port = free_port();
    let image_flag = images.to_str().unwrap();
    let _nodes = Nodes {
        procs: vec![(1, start_node_with(1, port, &dir, None, &["--image-dir", image_flag]))],
        dirs: vec![dir],
        ports: vec![port],
    };
    eventually("the node registers", 60, || {
        let s: Value =
            serde_json::from_str(&stdout(&cli(port, &["cluster", "status", "-o", "json"]))).ok()?;
        (s["nodes"].as_array()?.len() == 1).then_some(())
    });

    let cases: &[(&[&str], &str)] = &[
        (&["--kernel", "/etc/shadow"], "invalid kernel \"/etc/shadow\""),
        (&["--kernel", "../../etc/shadow"], "invalid kernel \"../../etc/shadow\""),
        (&["--kernel", "a/../../b"], "invalid kernel \"a/../../b\""),
        (&["--kernel", "."], "invalid kernel \".\""),
        (&["--kernel", "vmlinuz", "--initrd", "/etc/passwd"], "invalid initrd \"/etc/passwd\""),
        (&["--kernel", "/etc/shadow", "--count", "3"], "invalid kernel \"/etc/shadow\""),
        (&["--kernel", "/etc/shadow", "--dry-run"], "invalid kernel \"/etc/shadow\""),
        (&["--kernel", "/etc/shadow", "--wait"], "invalid kernel \"/etc/shadow\""),
    ];
    for (flags, shown) in cases {
        let mut args = vec!["vm", "create", "evil"];
        args.extend_from_slice(flags);
        let err = stderr(&exits(port, &args, 1));
        assert!(err.contains(shown) && err.contains(RULE), "{args:?}: {err}");
        assert!(err.contains("no absolute path, no '..'"), "{args:?}: the rule is stated: {err}");
    }
    let vms = json_of(port, &["vm", "list", "-o", "json"]);
    assert_eq!(vms, serde_json::json!([]), "a refused create left a VM");
    let out = exits(port, &["vm", "get", "evil"], 1);
    assert!(stderr(&out).contains("no VM named"), "{}", stderr(&out));

    // Names are accepted, subdirectories too; the VM records them as given
    // (its node resolves them when it boots it).
    ok(port, &["vm", "create", "fine", "--kernel", "custom/vmlinuz", "--initrd", "custom/initrd.img"]);
    let vm = json_of(port, &["vm", "get", "fine", "-o", "json"]);
    assert_eq!(
        (vm["kernel"].as_str(), vm["initrd"].as_str()),
        (Some("custom/vmlinuz"), Some("custom/initrd.img"))
    );

    // The help says what --kernel takes.
    let help = stdout(&cli(port, &["vm", "create", "--help"]));
    assert!(help.contains("--kernel <NAME>") && help.contains("--image-dir"), "{help}");
}

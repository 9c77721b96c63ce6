//! Tests of the test bed itself.

/// Fails when the host asks it to (`cargo xtask vm-test --fail-on-purpose`),
/// proving that a failing guest test fails the whole run.
#[test]
fn fails_on_purpose() {
    assert!(
        std::env::var_os("DMABUF_P2P_FAIL_ON_PURPOSE").is_none(),
        "failing on purpose, as the host asked (DMABUF_P2P_FAIL_ON_PURPOSE is set)"
    );
}

/// The host answers QMP requests from the guest (the path hot-unplug tests use).
#[test]
fn qmp_round_trip() {
    let answer = dmabuf_p2p_vm_tests::qmp("query-status", "{}");
    assert!(
        answer.contains("\"running\""),
        "query-status answered {answer}"
    );
    let bad = dmabuf_p2p_vm_tests::qmp("no-such-command", "{}");
    assert!(bad.contains("\"error\""), "a bad command answered {bad}");
}

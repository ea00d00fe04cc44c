//! Sets the `volplane_e2e` cfg when `VOLPLANE_E2E_BIN_DIR` is set, so the
//! e2e tests run with it and are listed as ignored without it.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(volplane_e2e)");
    println!("cargo::rerun-if-env-changed=VOLPLANE_E2E_BIN_DIR");
    if std::env::var_os("VOLPLANE_E2E_BIN_DIR").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=volplane_e2e");
    }
}

//! `demo`: start `parvis-agent`, which creates and starts the VM "demo" from the guest
//! images (Debian's kernel and a busybox userland), then attach this terminal to the VM's
//! serial console through the agent with `parvis vm console demo`. Inside the guest,
//! `poweroff -f` ends the VM; Ctrl-] detaches and stops it.

fn main() {
    let script = r#"
# The state folder holds Unix sockets, which the test host's 9p share cannot.
state="$(mktemp -d)"
echo "parvis demo: starting parvis-agent; on first start it creates the VM 'demo' (1 vCPU, 256 MiB) from the guest images and starts it"
parvis-agent --state-dir "$state" --listen 127.0.0.1:0 --demo "$IMAGES" --log warn \
    >"$SHARE/agent.out" 2>"$SHARE/agent.log" &
agent=$!
i=0
while ! grep -q '^token: ' "$SHARE/agent.out" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 300 ] || ! kill -0 "$agent" 2>/dev/null; then
        echo "parvis demo: parvis-agent did not start:"
        cat "$SHARE/agent.out" "$SHARE/agent.log"
        exit 1
    fi
    sleep 0.1
done
export PARVIS_ADDR="$(sed -n 's/.* listening on \([^ ]*\).*/\1/p' "$SHARE/agent.out")"
export PARVIS_TOKEN="$(sed -n 's/^token: //p' "$SHARE/agent.out")"
echo "parvis demo: the agent listens on $PARVIS_ADDR"
i=0
until parvis vm list | grep -q running; do
    i=$((i + 1))
    if [ "$i" -gt 50 ]; then parvis vm list; echo "parvis demo: the demo VM did not start"; exit 1; fi
    sleep 0.2
done
parvis vm list
parvis vm console demo
parvis vm stop demo >/dev/null 2>&1
parvis vm list
kill "$agent"
wait "$agent"
echo "parvis demo: done"
"#;
    match parvis_tests::testhost::run_interactive(script) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("demo: {e:#}");
            std::process::exit(1);
        }
    }
}

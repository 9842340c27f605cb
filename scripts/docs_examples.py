#!/usr/bin/env python3
"""Runs the shell examples of README.md and docs/*.md as a reader would, so they stay true.

A ```sh block preceded by `<!-- example: NAME -->` is an example; blocks with the same NAME run in one shell session,
in order (a later block may use what an earlier one set up). An optional `; app=PORT` in the marker starts a small
HTTP app on 127.0.0.1:PORT first (the "app" the examples put a proxy in front of).

The commands run unchanged except for what a reader substitutes by hand:
  HEX   -> the root fingerprint printed by the example's `mutual init`
  TOKEN -> the token printed by the example's latest `mutual token create`
  /var/lib/mutual, /etc/mutual -> directories under the run's temporary directory
and for what cannot run here: `systemctl` and `nginx -s reload` are recorded, not executed. Daemons (`mutual serve`,
`mutual proxy`, `mutual agent` without --once, lines ending in `&`) start in the background and are waited for (their
--listen port, or the agent's first certificate); `curl -N` (a stream) is cut after 3 s. Every other command must
exit 0 (curl with --fail-with-body). Host names resolve to 127.0.0.1 and ports are the documented ones: the wrapper
(scripts/docs-examples.sh) runs this inside a private network and mount namespace with its own /etc/hosts.

Prints one line per example and "N passed, N failed".
"""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = sys.argv[1]
MARKER = re.compile(r"<!--\s*example:\s*([\w.-]+)\s*(?:;\s*app=(\d+))?\s*-->")


def examples():
    files = ["README.md"] + sorted("docs/" + f for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
    found = {}
    for path in files:
        lines = open(os.path.join(ROOT, path), encoding="utf-8").read().split("\n")
        i = 0
        while i < len(lines):
            m = MARKER.search(lines[i])
            if m:
                j = i + 1
                while j < len(lines) and not lines[j].strip():
                    j += 1
                if j >= len(lines) or lines[j].strip() != "```sh":
                    sys.exit(f"{path}:{i + 1}: example marker not followed by a ```sh block")
                k = j + 1
                while k < len(lines) and lines[k].strip() != "```":
                    k += 1
                entry = found.setdefault(m.group(1), {"where": f"{path}:{i + 1}", "app": None, "lines": []})
                entry["app"] = entry["app"] or m.group(2)
                entry["lines"] += lines[j + 1:k]
                i = k
            i += 1
    return found


def strip_comment(line):
    """Drops a trailing `# comment` (a # after whitespace, outside quotes)."""
    quote = None
    for index, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line.rstrip()


def commands(lines):
    joined, current = [], ""
    for raw in lines:
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        text = strip_comment(current).strip()
        current = ""
        if text:
            joined.append(text)
    return joined


def substitute(command):
    command = command.replace("/var/lib/mutual", f"{WORK}/var/lib/mutual").replace("/etc/mutual", f"{WORK}/etc/mutual")
    # A bare placeholder, not a shell variable of the same name ($TOKEN, TOKEN=…).
    command = re.sub(r"(?<![$\w])HEX(?![=\w])", "$HEX", command)
    return re.sub(r"(?<![$\w])TOKEN(?![=\w])", "$TOKEN", command)


def option(words, name):
    for index, word in enumerate(words):
        if word == name and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def script_for(name, entry):
    """The bash script running one example: every command checked, daemons in the background, placeholders set."""
    out = ["set -u", "PIDS=()", "HEX=; TOKEN=",
           "stop() { for p in \"${PIDS[@]:-}\"; do [ -n \"$p\" ] && { pkill -TERM -P \"$p\" 2>/dev/null; kill \"$p\" 2>/dev/null; }; done; wait 2>/dev/null; }",
           "trap stop EXIT",
           "fail() { echo \"EXAMPLE-FAILED: $1\"; exit 1; }",
           "wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; return 1; }",
           "wait_file() { for _ in $(seq 300); do [ -s \"$1\" ] && return 0; sleep 0.1; done; return 1; }"]
    if entry["app"]:
        out.append(f"python3 -c 'import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(s):\n  s.send_response(200);s.end_headers();s.wfile.write(b\"hello from the app\\n\")\n def log_message(s,*a):pass\nh.HTTPServer((\"127.0.0.1\",{entry['app']}),H).serve_forever()' & PIDS+=($!)")
        out.append(f"wait_port {entry['app']} || fail 'the app did not start'")
    count = 0
    for original in commands(entry["lines"]):
        command = substitute(original)
        quoted = shlex.quote(original)
        out.append(f"echo \"+ \"{quoted}")
        try:
            words = shlex.split(command.rstrip("&").strip())
        except ValueError:
            words = command.split()
        background = command.endswith("&")
        tool, sub = (words + ["", ""])[0], (words + ["", ""])[1]
        daemon = tool == "mutual" and (sub in ("serve", "proxy") or (sub == "agent" and "--once" not in words and "status" not in words))
        count += 1
        if daemon or background:
            line = command.rstrip("&").strip()
            log = f"{WORK}/{name}-{count}.log"
            out.append(f"{line} > {log} 2>&1 & PIDS+=($!)")
            listen = option(words, "--listen")
            if sub == "agent":
                out.append(f"wait_file {option(words, '--out-dir')}/cert.pem || fail {quoted}\" did not deliver a certificate: $(tail -5 {log})\"")
            elif listen:
                port = listen.rsplit(":", 1)[1]
                out.append(f"wait_port {port} || fail {quoted}\" did not listen: $(tail -5 {log})\"")
            out.append(f"sleep 0.3; kill -0 $! 2>/dev/null || fail {quoted}\" exited: $(tail -5 {log})\"")
            continue
        if tool == "curl" and "-N" in words:
            out.append(f"timeout 3 {command}; rc=$?; [ $rc = 0 ] || [ $rc = 124 ] || fail {quoted}\" (exit $rc)\"")
            continue
        if tool == "curl":
            command = "curl --fail-with-body -sS" + command[len("curl"):]
        if tool == "mutual" and sub == "token" and "create" in words and not command.startswith("TOKEN="):
            out.append(f"TOKEN=$({command}) || fail {quoted}; echo \"$TOKEN\"")
            continue
        if tool == "mutual" and sub == "init":
            out.append(f"{command} > {WORK}/init.out 2>&1 || fail {quoted}\": $(cat {WORK}/init.out)\"; cat {WORK}/init.out")
            out.append(f"HEX=$(grep -o 'root SHA-256: *[0-9a-f]*' {WORK}/init.out | awk '{{print $NF}}')")
            out.append(f"[ -n \"$HEX\" ] || fail 'no root fingerprint in the output of '{quoted}")
            continue
        out.append(f"{command} || fail {quoted}\" (exit $?)\"")
    out.append(f"echo EXAMPLE-PASSED {count}")
    return "\n".join(out)


def main():
    found = examples()
    passed = failed = 0
    for name, entry in found.items():
        home = os.path.join(WORK, "home-" + name)
        cwd = os.path.join(WORK, "cwd-" + name)
        os.makedirs(home, exist_ok=True)
        os.makedirs(cwd, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUTUAL_")}
        env["HOME"] = home
        script = script_for(name, entry)
        with open(os.path.join(WORK, name + ".sh"), "w") as f:
            f.write(script)
        result = subprocess.run(["bash", os.path.join(WORK, name + ".sh")], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        output = result.stdout + result.stderr
        if result.returncode == 0 and "EXAMPLE-PASSED" in result.stdout:
            ran = result.stdout.rsplit("EXAMPLE-PASSED", 1)[1].strip()
            passed += 1
            print(f"ok   example '{name}' ({entry['where']}): {ran} commands ran as written")
        else:
            failed += 1
            print(f"FAIL example '{name}' ({entry['where']})")
            for line in output.strip().split("\n")[-25:]:
                print("     " + line)
    if not found:
        failed += 1
        print("FAIL no examples found")
    print(f"docs examples: {passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 else 1)


main()

#!/usr/bin/env bash
# Validates the swarm stack file without a Docker engine.
#
#   stack/check.sh
#
# 1. Every variable the stack file references is documented in
#    stack/.env.example (docker turns unknown variables into empty strings).
# 2. Every swarm `configs:` file exists (docker stack config does not check).
# 3. `docker stack config` renders the stack with ONLY stack/.env.example in
#    the environment (unknown keys, bad types, missing required `${VAR:?}`
#    values fail here).
# Steps 1-2 need no docker; step 3 is skipped when the docker client is absent.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
stack=stack/bidsflux-stack.yml
example=stack/.env.example

fail() { echo "check.sh: FAIL: $*" >&2; exit 1; }

[[ -f $stack ]] || fail "$stack not found"
[[ -f $example ]] || fail "$example not found"

# 1. Variables used by the stack (outside comments) vs. documented ones.
used=$(sed 's/[[:space:]]#.*$//; /^[[:space:]]*#/d' "$stack" \
    | grep -oE '\$\{[A-Za-z_][A-Za-z0-9_]*' | cut -c3- | sort -u)
documented=$(grep -oE '^[A-Za-z_][A-Za-z0-9_]*=' "$example" | tr -d '=' | sort -u)
missing=$(comm -23 <(echo "$used") <(echo "$documented"))
[[ -z $missing ]] || fail "variables used in $stack but not in $example: $(echo $missing)"
echo "ok: all $(echo "$used" | wc -l) stack variables are documented in $example"

# 2. Files of swarm configs (paths are relative to the stack file).
while read -r file; do
    [[ -f stack/$file ]] || fail "config file stack/$file (from $stack) does not exist"
done < <(sed -nE 's/^[[:space:]]+file:[[:space:]]*"?([^"#[:space:]]+)"?.*$/\1/p' "$stack")
echo "ok: config files exist"

# 3. Render with docker.
if ! command -v docker >/dev/null 2>&1; then
    echo "skipped: docker client not installed (docker stack config not run)"
    exit 0
fi
# A clean environment: only what .env.example sets (plus PATH/HOME for docker).
if ! out=$(env -i PATH="$PATH" HOME="${HOME:-/tmp}" bash -c '
        set -eu
        set -a; . stack/.env.example; set +a
        docker stack config -c stack/bidsflux-stack.yml
    ' 2>&1 >/dev/null); then
    echo "$out" >&2
    fail "docker stack config -c $stack rejected the stack (with $example)"
fi
echo "ok: docker stack config -c $stack renders with $example"

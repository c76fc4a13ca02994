#!/usr/bin/env bash
# Build an offline Ray Serve bundle for a GPU machine without internet (Python 3.12, x86-64): gpu_run.sh's ray stage.
#
#   benchmarks/ray_bundle.sh OUT_DIR        # then, there: BATCHPLEX_RAY_BUNDLE=OUT_DIR benchmarks/gpu_run.sh OUT ray
#
# Ray's wheel (79 MB) is over what may travel to such a machine with one call (64 MiB), so the bundle keeps what Ray
# core and Serve import: it drops rllib, tune, train, data, llm, air, the jars, tests, type stubs and source maps,
# strips the symbols of its three large binaries, and packs the rest with xz (23 MiB). The Serve extras the GPU
# machines lack ride along as unpacked wheels; the ones they have (aiohttp, grpcio, protobuf, ...) are used as they
# are. grpcio-reflection must not be newer than the machine's grpcio (1.84 there): its generated code refuses to load.
# OUT_DIR gets the .tar.xz, SHA256SUMS and install.sh (`bash install.sh TARGET`, then TARGET goes on PYTHONPATH).
set -euo pipefail
out=${1:?usage: benchmarks/ray_bundle.sh OUT_DIR}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
deps=(aiohttp_cors==0.8.1 annotated_types==0.8.0 colorful==0.5.8 fastapi==0.165.0 googleapis_common_protos==1.76.0
      grpcio_reflection==1.84.0 httptools==0.9.0 jsonschema==4.26.0 jsonschema_specifications==2025.9.1
      referencing==0.37.0 rpds_py==2026.9.1 mmh3==5.3.1 opencensus==0.11.4 opencensus_context==0.1.3
      opentelemetry_api==1.45.2 opentelemetry_sdk==1.45.2 opentelemetry_proto==1.45.2
      opentelemetry_semantic_conventions==0.66b2 opentelemetry_exporter_prometheus==0.66b2 pydantic==2.14.4
      pydantic_core==2.50.5 python_dotenv==1.2.4 smart_open==9.0.2 starlette==1.10.0 typing_inspection==0.4.5
      uvicorn==0.54.0 watchfiles==1.3.0 websockets==17.4)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/wheels" ray==2.60.0 "${deps[@]}"
tree="$work/tree"
mkdir -p "$tree"
for wheel in "$work"/wheels/*.whl; do
    unzip -q -o "$wheel" -d "$tree"
done
for part in jars rllib tune train data llm serve/llm air; do
    rm -rf "$tree/ray/$part"
done
if compgen -G "$tree/*.data" >/dev/null; then  # pip would move their contents; unpacking alone cannot
    echo "a pinned wheel has a .data folder ($(cd "$tree" && echo *.data)): unpack it as pip would" >&2
    exit 1
fi
find "$tree" -type d -name __pycache__ -prune -exec rm -rf {} +
find "$tree/ray" -type d -name tests -prune -exec rm -rf {} +
find "$tree/ray" \( -name '*.pyi' -o -name '*.map' \) -delete
strip --strip-unneeded "$tree"/ray/_raylet.so "$tree"/ray/core/src/ray/gcs/gcs_server \
    "$tree"/ray/core/src/ray/raylet/raylet "$tree"/ray/core/libjemalloc.so
mkdir -p "$out"
bundle=ray-2.60.0-serve-cp312-linux_x86_64.tar.xz
tar -C "$tree" -cf - . | xz -9 -T0 > "$out/$bundle"
(cd "$out" && sha256sum "$bundle" > SHA256SUMS)
cat > "$out/install.sh" <<EOF
#!/usr/bin/env bash
# Unpack the Ray Serve bundle into TARGET (then: export PYTHONPATH=TARGET\${PYTHONPATH:+:\$PYTHONPATH}).
set -euo pipefail
target=\${1:?usage: install.sh TARGET}
here=\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)
(cd "\$here" && sha256sum -c --quiet SHA256SUMS)
mkdir -p "\$target"
tar -xJf "\$here/$bundle" -C "\$target"
echo "ray 2.60.0 and Serve's dependencies unpacked into \$target"
EOF
du -sh "$out"

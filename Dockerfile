# The app image: Flower's official SuperExec image at the pinned Flower version plus
# fedlora's dependencies. It runs the ServerApp (`superexec-serverapp`) and the
# ClientApps (`superexec-clientapp-<i>`) of docker-compose.yml; the app code itself
# arrives with each `flwr run` (the FAB), so rebuild only when dependencies change.
#   docker build -t fedlora-app:0.1.0 .
#   GPU: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
ARG FLWR_VERSION=1.39.0
FROM flwr/superexec:${FLWR_VERSION}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedlora fedlora
COPY --chown=app:app strategies strategies
COPY --chown=app:app clients clients
COPY --chown=app:app conf conf
# flwr is in the base image at the pinned version: install fedlora's other
# dependencies, without the simulation extra (Ray) that a deployment does not use
RUN sed -i 's/"flwr\[simulation\]/"flwr/' pyproject.toml \
 && python -m pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" \
      "torch==2.13.0" .

USER root
RUN mkdir -p /data /app/outputs && chown app:app /data /app/outputs
USER app
ENV HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
    TOKENIZERS_PARALLELISM=false
ENTRYPOINT ["flower-superexec"]

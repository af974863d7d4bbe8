# syntax=docker/dockerfile:1
# stoker-certgen: issues the controller <-> agent mTLS certificates into Secrets
# (images/certgen/stoker-certgen.sh). A shell, openssl, curl and jq; ~15 MB.
#   docker build -f images/certgen.Dockerfile -t stoker-certgen .
FROM alpine:3.20
RUN apk add --no-cache openssl curl jq ca-certificates
COPY images/certgen/stoker-certgen.sh /usr/local/bin/stoker-certgen
RUN chmod 0755 /usr/local/bin/stoker-certgen
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stoker-certgen"]

"""A stock Python grpcio client of imaged over its unix socket (run by tests/it/python_client.rs).

Usage: client.py STUBS_DIR SOCKET MODE [QCOW2 DOMAIN]
  STUBS_DIR  where `python3 -m grpc_tools.protoc` wrote imaged/v1/imaged_pb2*.py
  MODE       `with-authority`: the channel sets grpc.default_authority=localhost and the script
             calls ListImages, ListDomains, GetDomain(DOMAIN), Import(QCOW2) then GetOperation
             until the operation ends, GetImage, ListImages, and lists the services through
             grpcio-reflection (reflection v1alpha);
             `without-authority`: a plain channel, one ListImages call.
Prints one JSON document on stdout with what each call returned (or its error code and details).
"""

import json
import sys
import time

import grpc


def main():
    stubs, socket, mode = sys.argv[1:4]
    sys.path.insert(0, stubs)
    from imaged.v1 import imaged_pb2 as pb
    from imaged.v1 import imaged_pb2_grpc as rpc

    target = "unix://" + socket
    out = {}
    if mode == "without-authority":
        channel = grpc.insecure_channel(target)
        try:
            rpc.ImageServiceStub(channel).ListImages(pb.ListImagesRequest(), timeout=30)
            out["list_images"] = "ok"
        except grpc.RpcError as e:
            out["list_images"] = {"code": e.code().name, "details": e.details()}
        print(json.dumps(out))
        return

    qcow2, domain = sys.argv[4:6]
    channel = grpc.insecure_channel(target, options=[("grpc.default_authority", "localhost")])
    images = rpc.ImageServiceStub(channel)
    domains = rpc.DomainServiceStub(channel)
    ops = rpc.OperationServiceStub(channel)

    out["images_before"] = [i.name for i in images.ListImages(pb.ListImagesRequest(), timeout=30).images]
    listed = domains.ListDomains(pb.ListDomainsRequest(), timeout=60).domains
    out["domains"] = [d.name for d in listed]
    d = domains.GetDomain(pb.GetDomainRequest(name=domain), timeout=60)
    out["domain"] = {
        "name": d.name,
        "state": pb.DomainState.Name(d.state),
        "system_disks": [k.path for k in d.disks if k.system_disk],
    }

    op = images.Import(pb.ImportRequest(path=qcow2, format="qcow2", image_name="py-import"), timeout=30)
    ended = ("OPERATION_STATE_ACTIVE", "OPERATION_STATE_FAILED", "OPERATION_STATE_CANCELLED")
    deadline = time.monotonic() + 120
    polls = 0
    while True:
        op = ops.GetOperation(pb.GetOperationRequest(id=op.id), timeout=30)
        polls += 1
        if pb.OperationState.Name(op.state) in ended or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out["import"] = {
        "state": pb.OperationState.Name(op.state),
        "error": op.error.message,
        "image_name": op.image_name,
        "bytes_total": op.progress.bytes_total,
        "polls": polls,
    }
    img = images.GetImage(pb.GetImageRequest(name="py-import"), timeout=30)
    out["image"] = {
        "name": img.name,
        "virtual_size": img.virtual_size,
        "source_format": img.source_format,
        "consistency": img.consistency,
        "content_digest": img.content_digest,
    }
    out["images_after"] = [i.name for i in images.ListImages(pb.ListImagesRequest(), timeout=30).images]

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    out["reflection_v1alpha"] = sorted(ProtoReflectionDescriptorDatabase(channel).get_services())
    print(json.dumps(out))


if __name__ == "__main__":
    main()

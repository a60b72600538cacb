"""A stock Python grpcio client of imaged (run by tests/it/python_client.rs and tests/it/trust.rs).

Usage: client.py STUBS_DIR TARGET MODE [ARGS...]
  STUBS_DIR  where `python3 -m grpc_tools.protoc` wrote imaged/v1/imaged_pb2*.py (only imaged's
             own proto: the google.* messages come from the googleapis-common-protos package,
             as in any real client)
  TARGET     a unix socket path, or `tls:HOST:PORT:CA:CERT:KEY` for TCP with mutual TLS
  MODE       `with-authority` QCOW2 DOMAIN: ListImages, ListDomains, GetDomain(DOMAIN),
             ImportImage(QCOW2), WatchOperation until done, WaitOperation, the Image unpacked
             from the operation's response, GetImage, ListImages, a NOT_FOUND whose
             ErrorInfo.reason is read from the status details, the services through
             grpcio-reflection (v1alpha);
             `paging`: ListImages page by page (page_size 100) and with a filter;
             `capture` DOMAIN IMAGE: CaptureImage (cold), WatchOperation, WaitOperation, the Image
             from the response, and a second capture of the same IMAGE refused with its reason;
             `call` METHOD: one call (list-images, capture DOMAIN IMAGE), reporting its code;
             `without-authority`: a plain channel on the unix socket, one ListImages call.
Prints one JSON document on stdout with what each call returned (or its error code, details and
ErrorInfo reason).
"""

import json
import sys

import grpc
from google.rpc import error_details_pb2, status_pb2


def reason_of(err):
    """The google.rpc.ErrorInfo reason of a failed call, from the status details trailer."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            st = status_pb2.Status.FromString(value)
            for d in st.details:
                if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    d.Unpack(info)
                    return info.reason
    return ""


def failure(err):
    return {"code": err.code().name, "details": err.details(), "reason": reason_of(err)}


def channel_for(target, authority=True):
    if target.startswith("tls:"):
        _, host, port, ca, cert, key = target.split(":")
        creds = grpc.ssl_channel_credentials(
            root_certificates=open(ca, "rb").read(),
            private_key=open(key, "rb").read(),
            certificate_chain=open(cert, "rb").read(),
        )
        return grpc.secure_channel(f"{host}:{port}", creds)
    options = [("grpc.default_authority", "localhost")] if authority else []
    return grpc.insecure_channel("unix://" + target, options=options)


def main():
    stubs, target, mode = sys.argv[1:4]
    args = sys.argv[4:]
    sys.path.insert(0, stubs)
    from imaged.v1 import imaged_pb2 as pb
    from imaged.v1 import imaged_pb2_grpc as rpc

    out = {}
    if mode == "without-authority":
        channel = channel_for(target, authority=False)
        try:
            rpc.ImageServiceStub(channel).ListImages(pb.ListImagesRequest(), timeout=30)
            out["list_images"] = "ok"
        except grpc.RpcError as e:
            out["list_images"] = failure(e)
        print(json.dumps(out))
        return

    channel = channel_for(target)
    images = rpc.ImageServiceStub(channel)
    domains = rpc.DomainServiceStub(channel)
    ops = rpc.OperationServiceStub(channel)

    def follow(op):
        """Watches an operation to its end, then waits on it: the final envelope."""
        states = []
        for snap in ops.WatchOperation(pb.WatchOperationRequest(name=op.name), timeout=600):
            meta = pb.OperationMetadata()
            snap.metadata.Unpack(meta)
            states.append(pb.OperationState.Name(meta.state))
        final = ops.WaitOperation(pb.WaitOperationRequest(name=op.name), timeout=600)
        meta = pb.OperationMetadata()
        final.metadata.Unpack(meta)
        res = {"done": final.done, "states": states, "state": pb.OperationState.Name(meta.state),
               "total_bytes": meta.progress.total_bytes}
        if final.HasField("error"):
            res["error"] = {"code": final.error.code, "message": final.error.message}
        if final.HasField("response"):
            img = pb.Image()
            if final.response.Unpack(img):
                res["image"] = {"name": img.name, "virtual_size_bytes": img.virtual_size_bytes,
                                "consistency": pb.Consistency.Name(img.consistency),
                                "content_digest": img.content_digest}
        return res

    if mode == "call":
        try:
            if args[0] == "list-images":
                images.ListImages(pb.ListImagesRequest(), timeout=30)
            elif args[0] == "capture":
                images.CaptureImage(pb.CaptureImageRequest(
                    image_id=args[2], domain="domains/" + args[1],
                    mode=pb.CAPTURE_MODE_COLD), timeout=60)
            out["result"] = "ok"
        except grpc.RpcError as e:
            out["result"] = failure(e)
        print(json.dumps(out))
        return

    if mode == "paging":
        names, pages, token = [], 0, ""
        while True:
            r = images.ListImages(pb.ListImagesRequest(page_size=100, page_token=token), timeout=30)
            pages += 1
            names += [i.name for i in r.images]
            token = r.next_page_token
            if not token:
                break
        out["pages"] = pages
        out["names"] = names
        r = images.ListImages(pb.ListImagesRequest(filter='name = "images/p-01*"', order_by="name desc"),
                              timeout=30)
        out["filtered"] = [i.name for i in r.images]
        print(json.dumps(out))
        return

    if mode == "capture":
        domain, image = args
        op = images.CaptureImage(pb.CaptureImageRequest(
            image_id=image, domain="domains/" + domain, mode=pb.CAPTURE_MODE_COLD,
            request_id="0b7d3f4e-2a4c-4f7e-9a51-3c2d1e0f9a8b"), timeout=60)
        out["capture"] = follow(op)
        try:
            images.CaptureImage(pb.CaptureImageRequest(
                image_id=image, domain="domains/" + domain, mode=pb.CAPTURE_MODE_COLD), timeout=60)
            out["again"] = "ok"
        except grpc.RpcError as e:
            out["again"] = failure(e)
        print(json.dumps(out))
        return

    qcow2, domain = args
    out["images_before"] = [i.name for i in images.ListImages(pb.ListImagesRequest(), timeout=30).images]
    listed = domains.ListDomains(pb.ListDomainsRequest(), timeout=60).domains
    out["domains"] = [d.name for d in listed]
    d = domains.GetDomain(pb.GetDomainRequest(name="domains/" + domain), timeout=60)
    out["domain"] = {
        "name": d.name,
        "state": pb.DomainState.Name(d.state),
        "system_disks": [k.path for k in d.disks if k.system_disk],
    }
    op = images.ImportImage(pb.ImportImageRequest(
        image_id="py-import", path=qcow2, format=pb.IMAGE_FORMAT_QCOW2), timeout=30)
    out["import"] = follow(op)
    img = images.GetImage(pb.GetImageRequest(name="images/py-import"), timeout=30)
    out["image"] = {
        "name": img.name,
        "virtual_size_bytes": img.virtual_size_bytes,
        "source_format": pb.ImageFormat.Name(img.source_format),
        "consistency": pb.Consistency.Name(img.consistency),
        "content_digest": img.content_digest,
    }
    out["images_after"] = [i.name for i in images.ListImages(pb.ListImagesRequest(), timeout=30).images]
    try:
        images.GetImage(pb.GetImageRequest(name="images/nope"), timeout=30)
        out["missing"] = "ok"
    except grpc.RpcError as e:
        out["missing"] = failure(e)

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    out["reflection_v1alpha"] = sorted(ProtoReflectionDescriptorDatabase(channel).get_services())
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""A gRPC client that knows nothing of Weft: it discovers the services through server reflection
and calls the standard health check. Prints a JSON summary. Usage: generic_client.py HOST:PORT"""

import json
import sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main() -> int:
    address = sys.argv[1]
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services="")]
        services = []
        for response in reflection.ServerReflectionInfo(iter(requests), timeout=10):
            services = [s.name for s in response.list_services_response.service]
        file_request = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="weft.v1.Publisher")]
        publish_input = ""
        for response in reflection.ServerReflectionInfo(iter(file_request), timeout=10):
            for raw in response.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                for service in fd.service:
                    if service.name == "Publisher":
                        for method in service.method:
                            if method.name == "Publish":
                                publish_input = method.input_type
        health = health_pb2_grpc.HealthStub(channel)
        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        publisher = health.Check(health_pb2.HealthCheckRequest(service="weft.v1.Publisher"), timeout=10)
    print(json.dumps({
        "services": services,
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(overall.status),
        "publisher_health": health_pb2.HealthCheckResponse.ServingStatus.Name(publisher.status),
        "publish_input": publish_input,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

// Command ballast-kubelet-registrar registers a CSI node plugin with kubelet,
// as the node-driver-registrar sidecar does, with the same flags.
//
// It asks the plugin for its name (CSI GetPluginInfo on --csi-address), then
// serves kubelet's plugin registration API (pluginregistration v1) on
// <--plugin-registration-path>/<name>-reg.sock. kubelet's plugin watcher finds
// the socket, calls GetInfo to learn the plugin's CSI endpoint on the node
// (--kubelet-registration-path), calls NodeGetInfo there, and reports the
// outcome with NotifyRegistrationStatus.
//
// Ballast ships it because node-driver-registrar's Go module is not served to
// this project; where the upstream image can be pulled, the chart can run that
// instead (values sidecars.registrar.image). The registration server is
// grpc-go: kubelet sends the socket's path as the HTTP/2 :authority of this
// call, which grpc-go accepts and Rust's h2 rejects, so the Rust node plugin
// cannot serve it itself.
//
// It owns nothing but its socket: it never calls anything on the plugin but
// GetPluginInfo.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// supportedVersions are the CSI versions announced to kubelet.
var supportedVersions = []string{"1.0.0"}

// registrar serves kubelet's Registration service for one plugin.
type registrar struct {
	registerapi.UnimplementedRegistrationServer
	driver   string
	endpoint string
	failed   chan<- string
}

// GetInfo tells kubelet the plugin's type, name and CSI endpoint on the node.
func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	log.Printf("kubelet asked for the plugin's info: %s at %s", r.driver, r.endpoint)
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: supportedVersions,
	}, nil
}

// NotifyRegistrationStatus records kubelet's verdict; a refusal ends the
// process so that the container restarts and registers again.
func (r *registrar) NotifyRegistrationStatus(_ context.Context, status *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if status.PluginRegistered {
		log.Printf("kubelet registered %s", r.driver)
	} else {
		r.failed <- status.Error
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// driverName asks the plugin at csiAddress for its name, retrying until
// timeout: the plugin may start after this container.
func driverName(csiAddress string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		name, err := tryDriverName(csiAddress)
		if err == nil {
			return name, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no answer from the CSI plugin at %s within %s: %w", csiAddress, timeout, err)
		}
		time.Sleep(time.Second)
	}
}

func tryDriverName(csiAddress string) (string, error) {
	conn, err := grpc.NewClient("unix://"+csiAddress,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Rust's h2 (the plugin's server) wants a host, not a path.
		grpc.WithAuthority("localhost"))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return "", err
	}
	if info.GetName() == "" {
		return "", errors.New("GetPluginInfo returned no name")
	}
	return info.GetName(), nil
}

func main() {
	csiAddress := flag.String("csi-address", "/csi/csi.sock", "Path of the CSI plugin's socket in this container.")
	kubeletPath := flag.String("kubelet-registration-path", "", "Path of the CSI plugin's socket on the node, as kubelet dials it.")
	registrationDir := flag.String("plugin-registration-path", "/registration", "Directory of kubelet's plugin registration sockets in this container.")
	timeout := flag.Duration("timeout", 5*time.Minute, "How long to wait for the CSI plugin's answer at start.")
	flag.Parse()
	if *kubeletPath == "" {
		log.Fatal("--kubelet-registration-path is required")
	}

	driver, err := driverName(*csiAddress, *timeout)
	if err != nil {
		log.Fatal(err)
	}
	socket := filepath.Join(*registrationDir, driver+"-reg.sock")
	// A socket left by an earlier run would keep kubelet on a dead server.
	if err := os.Remove(socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.Fatalf("cannot remove the stale socket %s: %v", socket, err)
	}
	listener, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", socket, err)
	}
	failed := make(chan string, 1)
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, &registrar{driver: driver, endpoint: *kubeletPath, failed: failed})
	go func() {
		if err := server.Serve(listener); err != nil {
			log.Printf("serving %s: %v", socket, err)
		}
	}()
	log.Printf("serving kubelet's plugin registration for %s on %s (endpoint %s)", driver, socket, *kubeletPath)

	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	status := 0
	select {
	case sig := <-signals:
		log.Printf("%s received", sig)
	case reason := <-failed:
		log.Printf("kubelet refused to register %s: %s", driver, reason)
		status = 1
	}
	server.Stop()
	// kubelet unregisters a plugin whose socket is gone.
	_ = os.Remove(socket)
	os.Exit(status)
}

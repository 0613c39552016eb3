/*
 * parvis-drm: the L2 test guest's DRM helper (static, built by build-images.sh).
 *
 *   parvis-drm run [WxH] [RECTS] [HOLD_SECONDS]
 *   parvis-drm echo EVDEV COUNT
 *
 * Takes the first connected connector of /dev/dri/card0, sets mode WxH (default: the
 * connector's preferred mode) on a dumb buffer filled with black, then draws RECTS
 * (default 8) rectangles, one at a time, each followed by DRM_IOCTL_MODE_DIRTYFB with
 * exactly that rectangle, and holds the mode for HOLD_SECONDS (default 5) so the host can
 * read it. Markers on stdout:
 *
 *   PARVIS-DRM-MODE=<w>x<h>x<stride>
 *   PARVIS-DRM-RECT=<i>,<x>,<y>,<w>,<h>      after rectangle i is drawn and flushed
 *   PARVIS-DRM-ERROR=<what>
 *
 * Pixel (x, y) of rectangle i is parvis_pixel(x, y, i), XRGB8888; the host test computes
 * the same function. The DRM uapi structs are declared here (no kernel headers needed).
 *
 * `echo` (latency benchmark): sets the preferred mode, then for each key press read from the
 * evdev node EVDEV prints `PARVIS-KEY=<code>` and immediately draws a 32x32 square (its
 * position advances per key) flushed with DIRTYFB, until COUNT presses or Escape.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct input_event_64 {
	int64_t sec, usec;
	uint16_t type, code;
	int32_t value;
};

struct drm_mode_modeinfo {
	uint32_t clock;
	uint16_t hdisplay, hsync_start, hsync_end, htotal, hskew;
	uint16_t vdisplay, vsync_start, vsync_end, vtotal, vscan;
	uint32_t vrefresh;
	uint32_t flags;
	uint32_t type;
	char name[32];
};

struct drm_mode_card_res {
	uint64_t fb_id_ptr, crtc_id_ptr, connector_id_ptr, encoder_id_ptr;
	uint32_t count_fbs, count_crtcs, count_connectors, count_encoders;
	uint32_t min_width, max_width, min_height, max_height;
};

struct drm_mode_get_connector {
	uint64_t encoders_ptr, modes_ptr, props_ptr, prop_values_ptr;
	uint32_t count_modes, count_props, count_encoders;
	uint32_t encoder_id, connector_id, connector_type, connector_type_id;
	uint32_t connection, mm_width, mm_height, subpixel;
	uint32_t pad;
};

struct drm_mode_get_encoder {
	uint32_t encoder_id, encoder_type, crtc_id, possible_crtcs, possible_clones;
};

struct drm_mode_crtc {
	uint64_t set_connectors_ptr;
	uint32_t count_connectors;
	uint32_t crtc_id, fb_id, x, y, gamma_size, mode_valid;
	struct drm_mode_modeinfo mode;
};

struct drm_mode_fb_cmd {
	uint32_t fb_id, width, height, pitch, bpp, depth, handle;
};

struct drm_mode_create_dumb {
	uint32_t height, width, bpp, flags, handle, pitch;
	uint64_t size;
};

struct drm_mode_map_dumb {
	uint32_t handle, pad;
	uint64_t offset;
};

struct drm_clip_rect {
	unsigned short x1, y1, x2, y2;
};

struct drm_mode_fb_dirty_cmd {
	uint32_t fb_id, flags, color, num_clips;
	uint64_t clips_ptr;
};

#define DRM_IOWR(nr, type) _IOWR('d', nr, type)
#define IOCTL_GETRESOURCES DRM_IOWR(0xA0, struct drm_mode_card_res)
#define IOCTL_SETCRTC DRM_IOWR(0xA2, struct drm_mode_crtc)
#define IOCTL_GETENCODER DRM_IOWR(0xA6, struct drm_mode_get_encoder)
#define IOCTL_GETCONNECTOR DRM_IOWR(0xA7, struct drm_mode_get_connector)
#define IOCTL_ADDFB DRM_IOWR(0xAE, struct drm_mode_fb_cmd)
#define IOCTL_DIRTYFB DRM_IOWR(0xB1, struct drm_mode_fb_dirty_cmd)
#define IOCTL_CREATE_DUMB DRM_IOWR(0xB2, struct drm_mode_create_dumb)
#define IOCTL_MAP_DUMB DRM_IOWR(0xB3, struct drm_mode_map_dumb)

#define MODE_TYPE_PREFERRED (1 << 3)

static int fail(const char *what)
{
	printf("PARVIS-DRM-ERROR=%s: %s\n", what, strerror(errno));
	fflush(stdout);
	return 1;
}

static int xioctl(int fd, unsigned long req, void *arg)
{
	int r;
	do {
		r = ioctl(fd, req, arg);
	} while (r == -1 && (errno == EINTR || errno == EAGAIN));
	return r;
}

/* Keep in sync with tests/tests/vmbus.rs (drm_pixel). */
static uint32_t parvis_pixel(uint32_t x, uint32_t y, uint32_t i)
{
	uint32_t r = (x * 7 + i * 13) & 0xff;
	uint32_t g = (y * 3 + i * 29) & 0xff;
	uint32_t b = (x ^ y ^ (i * 41)) & 0xff;
	return (r << 16) | (g << 8) | b;
}

int main(int argc, char **argv)
{
	unsigned want_w = 0, want_h = 0, rects = 8, hold = 5;
	int echo = argc >= 4 && strcmp(argv[1], "echo") == 0;
	if (!echo && (argc < 2 || strcmp(argv[1], "run") != 0)) {
		fprintf(stderr, "usage: parvis-drm run [WxH] [RECTS] [HOLD_SECONDS]\n"
				"       parvis-drm echo EVDEV COUNT\n");
		return 2;
	}
	if (!echo && argc > 2 && sscanf(argv[2], "%ux%u", &want_w, &want_h) != 2)
		want_w = want_h = 0;
	if (!echo && argc > 3)
		rects = (unsigned)atoi(argv[3]);
	if (!echo && argc > 4)
		hold = (unsigned)atoi(argv[4]);

	int fd = open("/dev/dri/card0", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return fail("open /dev/dri/card0");

	struct drm_mode_card_res res = { 0 };
	if (xioctl(fd, IOCTL_GETRESOURCES, &res))
		return fail("GETRESOURCES");
	uint32_t crtcs[16], conns[16], encs[16];
	if (res.count_crtcs > 16 || res.count_connectors > 16 || res.count_encoders > 16) {
		errno = E2BIG;
		return fail("too many DRM objects");
	}
	res.count_fbs = 0;
	res.fb_id_ptr = 0;
	res.crtc_id_ptr = (uintptr_t)crtcs;
	res.connector_id_ptr = (uintptr_t)conns;
	res.encoder_id_ptr = (uintptr_t)encs;
	if (xioctl(fd, IOCTL_GETRESOURCES, &res))
		return fail("GETRESOURCES (ids)");

	struct drm_mode_modeinfo modes[128], mode;
	struct drm_mode_get_connector conn;
	uint32_t conn_encs[16];
	int found = 0;
	for (uint32_t c = 0; c < res.count_connectors && !found; c++) {
		memset(&conn, 0, sizeof conn);
		conn.connector_id = conns[c];
		if (xioctl(fd, IOCTL_GETCONNECTOR, &conn))
			return fail("GETCONNECTOR");
		if (conn.connection != 1 || conn.count_modes == 0)
			continue;
		if (conn.count_modes > 128)
			conn.count_modes = 128;
		if (conn.count_encoders > 16)
			conn.count_encoders = 16;
		conn.count_props = 0;
		conn.props_ptr = conn.prop_values_ptr = 0;
		conn.modes_ptr = (uintptr_t)modes;
		conn.encoders_ptr = (uintptr_t)conn_encs;
		if (xioctl(fd, IOCTL_GETCONNECTOR, &conn))
			return fail("GETCONNECTOR (modes)");
		found = 1;
	}
	if (!found) {
		errno = ENODEV;
		return fail("no connected connector");
	}
	int pick = -1;
	for (uint32_t m = 0; m < conn.count_modes; m++) {
		if (want_w && modes[m].hdisplay == want_w && modes[m].vdisplay == want_h) {
			pick = (int)m;
			break;
		}
		if (!want_w && (modes[m].type & MODE_TYPE_PREFERRED) && pick < 0)
			pick = (int)m;
	}
	if (pick < 0 && !want_w)
		pick = 0;
	if (pick < 0) {
		errno = EINVAL;
		printf("PARVIS-DRM-ERROR=no %ux%u mode among %u\n", want_w, want_h, conn.count_modes);
		return 1;
	}
	mode = modes[pick];

	struct drm_mode_get_encoder enc = { .encoder_id = conn.encoder_id ? conn.encoder_id : conn_encs[0] };
	if (xioctl(fd, IOCTL_GETENCODER, &enc))
		return fail("GETENCODER");
	uint32_t crtc_id = enc.crtc_id;
	if (!crtc_id) {
		for (uint32_t i = 0; i < res.count_crtcs; i++)
			if (enc.possible_crtcs & (1u << i)) {
				crtc_id = crtcs[i];
				break;
			}
	}

	struct drm_mode_create_dumb dumb = { .height = mode.vdisplay, .width = mode.hdisplay, .bpp = 32 };
	if (xioctl(fd, IOCTL_CREATE_DUMB, &dumb))
		return fail("CREATE_DUMB");
	struct drm_mode_fb_cmd fb = {
		.width = mode.hdisplay, .height = mode.vdisplay, .pitch = dumb.pitch,
		.bpp = 32, .depth = 24, .handle = dumb.handle,
	};
	if (xioctl(fd, IOCTL_ADDFB, &fb))
		return fail("ADDFB");
	struct drm_mode_map_dumb map = { .handle = dumb.handle };
	if (xioctl(fd, IOCTL_MAP_DUMB, &map))
		return fail("MAP_DUMB");
	uint8_t *px = mmap(0, dumb.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)map.offset);
	if (px == MAP_FAILED)
		return fail("mmap");
	memset(px, 0, dumb.size);

	struct drm_mode_crtc crtc = {
		.set_connectors_ptr = (uintptr_t)&conn.connector_id,
		.count_connectors = 1,
		.crtc_id = crtc_id,
		.fb_id = fb.fb_id,
		.mode_valid = 1,
		.mode = mode,
	};
	if (xioctl(fd, IOCTL_SETCRTC, &crtc))
		return fail("SETCRTC");
	printf("PARVIS-DRM-MODE=%ux%ux%u\n", mode.hdisplay, mode.vdisplay, dumb.pitch);
	fflush(stdout);
	/* Let the host see the mode change before the first rectangle. */
	usleep(300 * 1000);

	uint32_t w = mode.hdisplay, h = mode.vdisplay;
	if (echo) {
		int ev = open(argv[2], O_RDONLY | O_CLOEXEC);
		if (ev < 0)
			return fail("open evdev");
		unsigned count = (unsigned)atoi(argv[3]), n = 0;
		printf("PARVIS-ECHO-READY\n");
		fflush(stdout);
		while (n < count) {
			struct input_event_64 e;
			ssize_t got = read(ev, &e, sizeof e);
			if (got != (ssize_t)sizeof e) {
				if (got < 0 && errno == EINTR)
					continue;
				return fail("read evdev");
			}
			if (e.type != 1 || e.value != 1)
				continue;
			if (e.code == 1)
				break;
			/* Draw first: the host times the notification. */
			uint32_t x = (n * 40) % (w - 32), y = ((n * 40) / (w - 32) * 40) % (h - 32);
			for (uint32_t yy = y; yy < y + 32; yy++) {
				uint32_t *row = (uint32_t *)(px + (size_t)yy * dumb.pitch);
				for (uint32_t xx = x; xx < x + 32; xx++)
					row[xx] = parvis_pixel(xx, yy, n);
			}
			struct drm_clip_rect clip = { x, y, x + 32, y + 32 };
			struct drm_mode_fb_dirty_cmd dirty = {
				.fb_id = fb.fb_id, .num_clips = 1, .clips_ptr = (uintptr_t)&clip,
			};
			if (xioctl(fd, IOCTL_DIRTYFB, &dirty))
				return fail("DIRTYFB");
			printf("PARVIS-KEY=%u\n", e.code);
			fflush(stdout);
			n++;
		}
		printf("PARVIS-ECHO-DONE\n");
		fflush(stdout);
		return 0;
	}
	for (unsigned i = 0; i < rects; i++) {
		/* Rectangles of varying size and place, inside the mode. */
		uint32_t rw = 16 + (i * 37) % (w / 4), rh = 8 + (i * 23) % (h / 4);
		uint32_t rx = (i * 131) % (w - rw), ry = (i * 71) % (h - rh);
		for (uint32_t y = ry; y < ry + rh; y++) {
			uint32_t *row = (uint32_t *)(px + (size_t)y * dumb.pitch);
			for (uint32_t x = rx; x < rx + rw; x++)
				row[x] = parvis_pixel(x, y, i);
		}
		struct drm_clip_rect clip = { rx, ry, rx + rw, ry + rh };
		struct drm_mode_fb_dirty_cmd dirty = {
			.fb_id = fb.fb_id, .num_clips = 1, .clips_ptr = (uintptr_t)&clip,
		};
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		if (xioctl(fd, IOCTL_DIRTYFB, &dirty))
			return fail("DIRTYFB");
		printf("PARVIS-DRM-RECT=%u,%u,%u,%u,%u,%lld.%09ld\n", i, rx, ry, rw, rh,
		       (long long)ts.tv_sec, ts.tv_nsec);
		fflush(stdout);
		usleep(200 * 1000);
	}
	printf("PARVIS-DRM-DONE\n");
	fflush(stdout);
	sleep(hold);
	return 0;
}
